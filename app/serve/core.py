"""The Serve app's logic without Ray: requests in, RenderRequests out; rendered pixels in, QC'd,
post-processed, catalogued images out. `app/serve/app.py` only wires this to Ray Serve.

All three HTTP dialects (native, OpenAI, AUTOMATIC1111) are translated into one `ImageJob`, so
limits, model checks and the catalog are the same whichever door a request came through.

When CLIP runs on the generator (`QcSettings.clip_runs_on_generator`, decided in `build_app`), a
replica's `rendered_rows` carry each image's CLIP measures and `ServeCore(clip_on_generator=True)`
grades them without loading CLIP.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import secrets
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from app.accelerator import AcceleratorSettings
from app.conditioning.errors import ConditioningError
from app.conditioning.measures import MEASURE_COLUMNS
from app.conditioning.plan import ModeSettings, Planned, plan_request
from app.expand import ResolvedModels, RowError, build_request, lora_stack
from app.models.catalog import ModelCatalog, ResolvedModel, default_home
from app.models.digest import ModelFileError
from app.provenance.settings import build_provenance
from app.qc.clip_measures import measure_columns
from app.request import RenderRequest, parse_lora_tags, requests_to_numpy
from app.schedulers import SCHEDULERS
from app.serve.config import ServeConfig
from app.serve.errors import RequestError
from app.serve.uploads import Upload, Uploads
from app.spec import Size, size_problem
from app.stages import CatalogWrite, Postprocess, QualityControl
from app.storage import OutputStore, StorageFull

A1111_SAMPLERS = {v[2]: k for k, v in reversed(list(SCHEDULERS.items()))}  # "Euler a" -> euler_a
A1111_OPTIONS_PATH = "serve/a1111-options.json"  # the A1111 dialect's checkpoint, shared by the server's replicas
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")
# The generic field a conditioning refusal is about (`ConditioningError.reason`); `ImageInput.fields`
# renames them into a dialect's own (A1111: init_images, denoising_strength).
REASON_FIELDS = {
    "mask_size": "mask",
    "mask_keeps_all": "mask",
    "mask_keeps_none": "mask",
    "mask_band": "mask",
    "outpaint_target": "target",
    "upscale_settings": "scale",
    "mode": "mode",
    "strength": "strength",
    "resize_mode": "resize_mode",
}


@dataclass(frozen=True)
class A1111Schedule:
    """An AUTOMATIC1111 (1.9+) `scheduler` (the noise schedule, apart from the sampler) and, for each
    imagefab scheduler it applies to, the imagefab scheduler that renders with it."""

    name: str
    label: str
    aliases: tuple[str, ...]
    variants: dict[str, str]

    def matches(self, text: str) -> bool:
        return text.casefold() in {n.casefold() for n in (self.name, self.label, *self.aliases)}


A1111_SCHEDULES = (
    # The sampler's own schedule, as imagefab's scheduler of that A1111 name configures it.
    A1111Schedule("automatic", "Automatic", (), {k: k for k in SCHEDULERS}),
    A1111Schedule("karras", "Karras", (), {"dpmpp_2m": "dpmpp_2m_karras", "dpmpp_2m_karras": "dpmpp_2m_karras"}),
    # Evenly spaced timesteps ending at the last one: diffusers' "trailing" spacing.
    A1111Schedule(
        "sgm_uniform",
        "SGM Uniform",
        ("SGMUniform",),
        {
            "euler": "euler_trailing",
            "euler_trailing": "euler_trailing",
            "euler_a": "euler_a_trailing",
            "euler_a_trailing": "euler_a_trailing",
        },
    ),
)


def a1111_scheduler(sampler: str | None, schedule: str | None, combination_scheduler: str) -> str | None:
    """imagefab's scheduler for an A1111 `sampler_name` + `scheduler`; None: the combination's own.

    A missing `scheduler`, or "Automatic", keeps the sampler's schedule; "Karras" and "SGM Uniform"
    pick the imagefab scheduler that renders the sampler with that schedule, where one exists."""
    chosen = None
    if sampler:
        chosen = A1111_SAMPLERS.get(sampler) or (sampler if sampler in SCHEDULERS else None)
        if chosen is None:
            raise RequestError(422, "sampler_name", f"unknown sampler '{sampler}' (GET /sdapi/v1/samplers lists them)")
    if not schedule:
        return chosen
    found = next((s for s in A1111_SCHEDULES if s.matches(schedule)), None)
    if found is None:
        valid = ", ".join(s.label for s in A1111_SCHEDULES)
        raise RequestError(
            422, "scheduler", f"unknown scheduler '{schedule}' (valid: {valid}; GET /sdapi/v1/schedulers lists them)"
        )
    target = chosen or combination_scheduler
    if target not in found.variants:
        samplers = sorted({SCHEDULERS[k][2] for k in found.variants})
        raise RequestError(
            422,
            "scheduler",
            f"'{found.label}' is not available with sampler '{SCHEDULERS[target][2]}' "
            f"(it is with: {', '.join(samplers)})",
        )
    return found.variants[target]


def a1111_schedule_label(scheduler: str) -> str:
    """The A1111 scheduler label an imagefab scheduler renders with (for `info`)."""
    for s in A1111_SCHEDULES[1:]:
        if scheduler in s.variants.values():
            return s.label
    return "Automatic"


@dataclass(frozen=True)
class ImageInput:
    """An image-conditioned job's inputs: the accepted uploads and the mode's settings. `fields`
    renames the generic field names (image, mask, strength, …) into the dialect's for 4xx answers."""

    settings: ModeSettings
    image: Upload
    mask: Upload | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def name_of(self, generic: str) -> str:
        return self.fields.get(generic, generic)

    @property
    def uploads(self) -> list[Upload]:
        return [self.image] if self.mask is None else [self.image, self.mask]


def refused_field(e: ConditioningError) -> str:
    """The generic field a conditioning refusal is about."""
    if e.reason == "upscale_settings" and e.detail.startswith(("tile size", "overlap")):
        return "tile" if e.detail.startswith("tile size") else "tile_overlap"
    if e.reason == "outpaint_target" and e.detail.startswith(("anchor", "fill")):
        return e.detail.split(" ", 1)[0]
    return REASON_FIELDS.get(e.reason, "image")


def mode_settings(fields: dict[str, str] | None = None, **settings) -> ModeSettings:
    """`ModeSettings(**settings)`, a refusal as a 422 naming the request's own field."""
    try:
        return ModeSettings(**settings)
    except ConditioningError as e:
        generic = refused_field(e)
        if e.reason == "mask_band":  # out-of-range numbers, not a mask's shape
            generic = "mask_blur" if not 0 <= settings.get("mask_blur", 4) <= 64 else "blend_px"
        raise RequestError(422, (fields or {}).get(generic, generic), e.detail) from None


def fitted_size(width: int, height: int, max_side: int, max_pixels: int) -> tuple[int, int]:
    """An input's own size as a render size: scaled down (never up) within `max_side` and
    `max_pixels`, each side then rounded down to a multiple of 8, at least 64."""
    scale = min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))
    return max(64, int(width * scale) // 8 * 8), max(64, int(height * scale) // 8 * 8)


@dataclass
class A1111Task:
    """One A1111 txt2img or img2img request in flight: its images, how many have come back from
    the generators, and its interrupt. `/sdapi/v1/progress` reports these (the caller's own)."""

    interrupt: asyncio.Event  # what POST /sdapi/v1/interrupt sets
    started: float
    kind: str = "txt2img"  # or img2img: A1111's `state.job`
    images: int = 0  # known once the request is planned
    steps: int = 0
    done: int = 0


def a1111_progress_report(tasks: list[A1111Task], now: float) -> dict:
    """AUTOMATIC1111's `/sdapi/v1/progress` answer for a caller's requests in flight.

    Progress is images rendered / images asked for, over those requests: a generator renders a
    batch in one call, so it moves by whole images (never by sampling step, which stays 0). ETA as
    A1111 computes it: elapsed / progress − elapsed, from the oldest request's start."""
    total = sum(t.images for t in tasks)
    done = sum(t.done for t in tasks)
    progress = min(done / total, 1.0) if total else 0.0
    first = min(tasks, key=lambda t: t.started) if tasks else None
    elapsed = now - first.started if first else 0.0
    eta = elapsed / progress - elapsed if progress > 0 else 0.0
    return {
        "progress": round(progress, 4),
        "eta_relative": round(max(eta, 0.0), 2),
        "current_image": None,
        "textinfo": f"{done}/{total} images" if tasks else None,
        "state": {
            "skipped": False,
            "interrupted": any(t.interrupt.is_set() for t in tasks),
            "job": first.kind if first else "",
            "job_count": len(tasks),
            "job_timestamp": datetime.fromtimestamp(first.started, UTC).strftime("%Y%m%d%H%M%S") if first else "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": first.steps if first else 0,
        },
    }


@dataclass
class ImageJob:
    """One HTTP request, whatever its dialect: n images of one prompt (and an input image, when
    `image_input` is set: the request is then planned like a bulk row of that mode)."""

    prompt: str
    negative_prompt: str = ""
    combination: str | None = None
    base: str | None = None  # replaces the combination's base (A1111 sd_model_checkpoint)
    loras: list[tuple[str, float]] | None = None  # replaces the combination's stack
    seed: int | None = None  # None or -1: random; image k gets seed + k
    n: int = 1
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    tags: dict = field(default_factory=dict)
    image_input: ImageInput | None = None


@dataclass
class ServedImage:
    image_id: str
    seed: int
    status: str
    reasons: list[str]
    scores: dict
    error: str
    uri: str
    width: int
    height: int
    png: bytes  # the master file, metadata embedded
    request: RenderRequest | None = None
    cost_usd: float = 0.0  # as catalogued: device and CPU time at list prices, plus an API's price


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111 prompt syntax: 'a cat <lora:style:0.8>' -> ('a cat', [('style', 0.8)])."""
    text, tags = parse_lora_tags(prompt)
    loras = []
    for name, weight in tags:
        try:
            loras.append((name, float(weight)))
        except ValueError:
            raise RequestError(422, "prompt", f"LoRA tag weight {weight!r} of '{name}' is not a number") from None
    return text, loras


def resolve_serve_models(config: ServeConfig) -> ResolvedModels:
    """Every base of the configured combinations, and every catalog LoRA usable with them.

    Requests may name any catalog LoRA (A1111 `<lora:…>` tags), so all are checked at start-up;
    one that cannot be used is recorded and requests for it get a 4xx naming why.
    """
    catalog = ModelCatalog.load(config.models_catalog)
    bases: dict[str, ResolvedModel] = {}
    loras: dict[str, ResolvedModel] = {}
    problems: dict[str, str] = {}
    for combo in config.effective_combinations().values():
        bases.setdefault(combo.base, catalog.resolve_base(combo.base))
        for lo in combo.loras:  # the configured stacks must work: fail at start-up
            loras[lo.name] = catalog.resolve_lora(lo.name, bases[combo.base])
    for name in catalog.names("lora"):
        if name in loras:
            continue
        entry = catalog.entries[name]
        if entry.source_kind == "hub":
            continue
        try:
            loras[name] = catalog.resolve_lora(name)
        except (ModelFileError, KeyError) as e:
            problems[name] = str(e)
    return ResolvedModels(bases=bases, loras=loras, known_loras=tuple(sorted(loras)), lora_problems=problems)


def rendered_rows(
    requests: list[RenderRequest], results: list, accelerator: AcceleratorSettings, clip=None
) -> list[dict]:
    """What a generator replica returns for each request, in order (`ServeCore.finish` reads it).

    `results` are the `Generator.render` results; `clip` is a `ClipMeasurer` (app/qc/clip_stage.py)
    when CLIP runs on the generator: its columns are added and its time shared into `gpu_seconds`.
    """
    by_id = {r.image_id: r for r in results}
    rows = []
    for q in requests:
        r = by_id[q.image_id]
        rows.append(
            {
                "image_id": r.image_id,
                "error": r.error,
                "nonfinite_fraction": r.nonfinite_fraction,
                "gpu_seconds": r.gpu_seconds,
                "batch_id": r.batch_id,
                "batch_size": r.batch_size,
                "accelerator": accelerator.label(),
                "accelerator_settings": accelerator.to_value(),
                "pixels": b"" if r.pixels is None else r.pixels.tobytes(),
                **(r.measures.as_columns() if getattr(r, "measures", None) else {}),
            }
        )
    if clip is not None:
        clip.add_to_results(rows, [by_id[q.image_id].pixels for q in requests], [q.prompt for q in requests])
    return rows


class ServeCore:
    def __init__(
        self, config: ServeConfig, models: ResolvedModels, run_id: str | None = None, clip_on_generator: bool = False
    ):
        self.config = config
        self.models = models
        self.combos = config.effective_combinations()
        self.output = OutputStore.at(config.output_uri)
        now = datetime.now(UTC)
        self.run_id = run_id or f"serve-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
        self.qc = QualityControl(config.qc, self._duplicate_index(config), clip_on_generator)
        self.provenance = build_provenance(
            config.provenance,
            config.rights,
            ModelCatalog.load(config.models_catalog).licences(),
            default_home(),
            report=None,
        )
        self.screen = config.screening.prompt_screen()  # None: prompts are not screened
        self.post = Postprocess(config.postprocess, self.output, self.provenance)
        self.write = CatalogWrite(self.output, self.run_id, source="serve")
        self.uploads = Uploads(self.output, config.limits.input_limits())

    def _duplicate_index(self, config: ServeConfig):
        """This replica's near-duplicate index, loaded with the catalog (bulk and served images)."""
        if "duplicates" not in config.qc.enabled:
            return None
        from app.catalog.store import CatalogStore
        from app.qc.duplicates import PhashIndex

        index = PhashIndex()
        existing = CatalogStore(self.output).read(["image_id", "phash", "status", "created_at"])
        if existing.num_rows:
            index.add_catalog(existing)
        return index

    # --- names a request may give -----------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """What OpenAI's `model` accepts: every combination, then every base model (plain, no LoRAs)
        whose name no combination takes."""
        return [*self.combos, *(b for b in self.models.bases if b not in self.combos)]

    def model_choice(self, model: str | None) -> dict:
        """ImageJob fields for an OpenAI `model`: a combination, or a base model without LoRAs."""
        if not model or model in self.combos:
            return {"combination": model}
        if model in self.models.bases:
            return {"base": model, "loras": []}
        raise RequestError(404, "model", f"unknown model '{model}' (valid: {', '.join(self.model_ids())})")

    def steps_for_quality(self, choice: dict, quality: str | None) -> int | None:
        """Steps for an OpenAI `quality`: the configured factor on the chosen combination's steps,
        at least 1 and at most `limits.max_steps`; None (the combination's own) without one."""
        if quality is None:
            return None
        factors = self.config.quality_steps
        if quality not in factors:
            raise RequestError(
                400, "quality", f"'{quality}' is not offered by this server (offered: {', '.join(factors)})"
            )
        steps = self.combos[choice.get("combination") or self.config.default].steps or self.config.steps
        return min(max(1, round(steps * factors[quality])), self.config.limits.max_steps)

    def checkpoint_choice(self, checkpoint: str) -> tuple[str | None, str | None]:
        """(combination, base) for an A1111 checkpoint title ("name [hash]" or a name)."""
        name = str(checkpoint).split(" [", 1)[0]
        return (name, None) if name in self.combos else (None, name)

    def checkpoint_titles(self) -> list[str]:
        """What the A1111 dialect's `sd_model_checkpoint` may be set to: base titles, then combinations."""
        return [*(f"{b.name} [{b.sha256[:10]}]" for b in self.models.bases.values()), *self.combos]

    def a1111_checkpoint(self) -> str:
        """The A1111 dialect's current checkpoint: a base title or a combination name."""
        try:
            chosen = json.loads(self.output.read_bytes(A1111_OPTIONS_PATH)).get("sd_model_checkpoint")
        except (OSError, ValueError):
            chosen = None
        combination, base = self.checkpoint_choice(chosen) if isinstance(chosen, str) else (None, None)
        if base in self.models.bases:
            b = self.models.bases[base]
            return f"{b.name} [{b.sha256[:10]}]"
        return combination or self.config.default  # unset, or set to what this config no longer serves

    def set_a1111_checkpoint(self, checkpoint: object) -> str:
        if not isinstance(checkpoint, str):
            raise RequestError(422, "sd_model_checkpoint", "is a checkpoint title or a combination name")
        combination, base = self.checkpoint_choice(checkpoint)
        if combination is None and base not in self.models.bases:
            raise RequestError(
                422,
                "sd_model_checkpoint",
                f"unknown checkpoint '{checkpoint[:100]}' (valid: {', '.join(self.checkpoint_titles())})",
            )
        self.output.write_bytes(A1111_OPTIONS_PATH, json.dumps({"sd_model_checkpoint": checkpoint}).encode())
        return self.a1111_checkpoint()

    # --- requests -> render requests ------------------------------------------------------------
    def plan(self, job: ImageJob) -> list[RenderRequest]:
        lim = self.config.limits
        prompt = " ".join((job.prompt or "").split())
        if not prompt:
            raise RequestError(422, "prompt", "is empty")
        if self.screen is not None and (blocked := self.screen.reason(prompt)):
            # before anything renders, as in bulk runs (`screening.prompt_terms`)
            raise RequestError(
                400, "prompt", f"refused by the server's prompt screening ({blocked})", "moderation_blocked"
            )
        if len(job.prompt) > lim.max_prompt_chars:
            raise RequestError(422, "prompt", f"has {len(job.prompt)} characters; at most {lim.max_prompt_chars}")
        if len(job.negative_prompt or "") > lim.max_prompt_chars:
            raise RequestError(422, "negative_prompt", f"is longer than {lim.max_prompt_chars} characters")
        if not 1 <= job.n <= lim.max_images:
            raise RequestError(422, "n", f"{job.n} images asked for; 1..{lim.max_images} per request")
        name = job.combination or self.config.default
        if name not in self.combos:
            raise RequestError(404, "model", f"unknown combination '{name}' (served: {', '.join(self.combos)})")
        combo = self.combos[name]
        if job.base and job.base != combo.base:
            if job.base not in self.models.bases:
                raise RequestError(
                    404, "model", f"unknown base model '{job.base}' (served: {', '.join(self.models.bases)})"
                )
            combo = combo.model_copy(update={"base": job.base, "loras": ()})
            name = f"{name}@{job.base}"
        updates = {
            k: v
            for k, v in (("steps", job.steps), ("guidance", job.guidance), ("scheduler", job.scheduler))
            if v is not None
        }
        if job.steps is not None and not 1 <= job.steps <= lim.max_steps:
            raise RequestError(422, "steps", f"{updates['steps']} is outside 1..{lim.max_steps}")
        if job.guidance is not None and not 0 <= job.guidance <= 50:
            raise RequestError(422, "guidance", f"{updates['guidance']} is outside 0..50")
        if "scheduler" in updates and updates["scheduler"] not in SCHEDULERS:
            raise RequestError(
                422, "scheduler", f"unknown scheduler '{updates['scheduler']}' (valid: {', '.join(SCHEDULERS)})"
            )
        combo = combo.model_copy(update=updates) if updates else combo
        width, height = self._size(job)
        planned = self._planned(job.image_input, width, height) if job.image_input else None
        base = self.models.bases[combo.base]
        wanted = job.loras if job.loras is not None else [(lo.name, lo.weight) for lo in combo.loras]
        try:
            loras = lora_stack(wanted, self.models, base)
        except RowError as e:
            raise RequestError(404 if "unknown LoRA" in str(e) else 422, "loras", str(e)) from None
        first = secrets.randbelow(2**63 - lim.max_images) if job.seed is None or job.seed < 0 else int(job.seed)
        if first >= 2**63 - job.n:
            raise RequestError(422, "seed", f"{first} is outside 0..2^63-{job.n + 1}")
        tags = {str(k): str(v) for k, v in (job.tags or {}).items()}
        try:
            return [
                build_request(
                    prompt=prompt,
                    negative_prompt=job.negative_prompt or "",
                    base=base,
                    loras=loras,
                    combo=combo,
                    combination=name,
                    width=width if planned is None else planned.width,
                    height=height if planned is None else planned.height,
                    seed=first + k,
                    tags=tags,
                    tier="serve",
                    row_key=prompt[:80],
                    variation=k,
                    conditioning=None if planned is None else planned.conditioning,
                )
                for k in range(job.n)
            ]
        except RowError as e:  # strength x steps leaves no denoising step
            name = job.image_input.name_of("strength") if job.image_input else "steps"
            raise RequestError(422, name, str(e)) from None

    def _size(self, job: ImageJob) -> tuple[int, int]:
        """The render size asked for: txt2img's and img2img's (an img2img without one renders at its
        input's own size, fitted within the limits); other modes decide their own and take none."""
        lim = self.config.limits
        given = job.image_input
        if given is not None and given.settings.mode != "img2img":
            if job.width or job.height:
                raise RequestError(
                    422,
                    "size",
                    f"{given.settings.mode} decides its own output size (from the input image"
                    f"{', the target' if given.settings.mode == 'outpaint' else ''}"
                    f"{', the scale' if given.settings.mode == 'upscale' else ''}): leave width, height and size out",
                )
            return 0, 0
        if given is not None and not (job.width or job.height):
            width, height = fitted_size(given.image.image.width, given.image.image.height, lim.max_side, lim.max_pixels)
        else:
            default = Size.parse(self.config.default_size)
            width, height = job.width or default.width, job.height or default.height
        problem = size_problem(width, height)
        if problem or max(width, height) > lim.max_side or width * height > lim.max_pixels:
            raise RequestError(
                422,
                "size",
                problem
                or f"{width}x{height} is larger than this server allows "
                f"({lim.max_side} per side, {lim.max_pixels} pixels)",
            )
        return width, height

    def _planned(self, given: ImageInput, width: int, height: int) -> Planned:
        """The input planned like a bulk row (app/conditioning/plan.py), its output within the
        server's size limits; the Conditioning names where the uploads are stored."""
        lim = self.config.limits
        try:
            planned = plan_request(
                given.settings, given.image.image, None if given.mask is None else given.mask.image, width, height
            )
        except ConditioningError as e:
            raise RequestError(e.http_status, given.name_of(refused_field(e)), e.detail) from None
        w, h = planned.width, planned.height
        if max(w, h) > lim.max_side or w * h > lim.max_pixels:
            mode = given.settings.mode
            what = {"upscale": "scale", "outpaint": "target"}.get(mode, "image")
            raise RequestError(
                422,
                given.name_of(what),
                f"{mode} of this input renders {w}x{h}, larger than this server allows "
                f"({lim.max_side} per side, {lim.max_pixels} pixels)",
            )
        cond = replace(
            planned.conditioning,
            image_uri=given.image.uri,
            mask_uri="" if given.mask is None else given.mask.uri,
        )
        return replace(planned, conditioning=cond)

    def check_space(self) -> None:
        """Refuse new images while the output store's disk is below `limits.min_free_bytes`."""
        reserve = self.config.limits.min_free_bytes
        free = self.output.free_bytes() if reserve else None
        if free is not None and free < reserve:
            raise StorageFull(
                f"{self.output.uri}: {free} bytes free, below this server's reserve of {reserve} "
                "(limits.min_free_bytes)"
            )

    def store_inputs(self, given: ImageInput) -> None:
        """Write a planned job's uploads where its requests say they are (content-addressed)."""
        self.uploads.store(given.uploads)

    # --- rendered pixels -> catalogued images ---------------------------------------------------
    def finish(self, requests: list[RenderRequest], results: list[dict]) -> list[ServedImage]:
        """QC, post-processing and a catalog append (source=serve) for one HTTP request's images."""

        def col(key, default, dtype=object):
            return np.asarray([r.get(key, default) for r in results], dtype=dtype)

        errors = [r.get("error") or "" for r in results]
        batch = {
            "image_id": np.asarray([q.image_id for q in requests], dtype=object),
            "status": np.asarray(["failed" if e else "pending" for e in errors], dtype=object),
            "error": np.asarray(errors, dtype=object),
            "request": requests_to_numpy(requests),
            "combination": np.asarray([q.combination_key for q in requests], dtype=object),
            "pixels": col("pixels", b""),
            "nonfinite": col("nonfinite_fraction", 0.0, np.float64),
            "gpu_seconds": col("gpu_seconds", 0.0, np.float64),
            "accelerator": col("accelerator", ""),
            "accelerator_settings": col("accelerator_settings", None),
            "batch_id": col("batch_id", ""),
            "batch_size": col("batch_size", 0, np.int32),
            **{name: col(name, empty) for name, empty in measure_columns(None).items()},
            **{name: col(name, np.nan, np.float64) for name in MEASURE_COLUMNS},
        }
        # The catalog row is written before the images are returned: a 200 always has its rows. A
        # store failing in between (StorageError: 507/503) leaves at most whole, unlisted masters,
        # which a request for the same image writes again (image ids come from the request).
        post = self.post(self.qc(batch))
        written = self.write(post)
        out = []
        for i, q in enumerate(requests):
            uri = str(post["uri"][i])
            png = self.output.read_bytes(self.output.rel_of(uri)) if uri else b""
            out.append(
                ServedImage(
                    image_id=q.image_id,
                    seed=q.seed,
                    status=str(post["status"][i]),
                    reasons=json.loads(post["reasons"][i]),
                    scores=json.loads(post["scores"][i]),
                    error=str(post["error"][i]),
                    uri=uri,
                    width=q.width,
                    height=q.height,
                    png=png,
                    request=q,
                    cost_usd=float(written["cost_usd"][i]),
                )
            )
        return out

    def encoded(self, png: bytes, fmt: str, quality: int | None) -> bytes:
        """A master PNG as `fmt` ("png": the master itself), its metadata embedded again and, with
        C2PA on, signed with the master as its parent ingredient (the pixels are the master's:
        deterministic; the manifest's signature time is not)."""
        if fmt == "png":
            return png
        from PIL import Image

        from app.metadata import ImageMetadata, read_metadata
        from app.postprocess import encode_image

        meta = read_metadata(png).get("imagefab")
        metadata = ImageMetadata.from_dict(meta) if isinstance(meta, dict) else None
        with Image.open(io.BytesIO(png)) as image:
            data = encode_image(image, fmt, metadata, quality=quality or 100)  # type: ignore[arg-type]
        prov = self.provenance
        if prov is None or prov.signer is None or metadata is None:
            return data
        # Signed like a stored variant: the master is its parent ingredient (C2PA `c2pa.opened`)
        from app.provenance import watermark
        from app.provenance.signing import Ingredient, sign_variant
        from app.stages import image_path

        master = image_path(metadata.image_id).rsplit("/", 1)[-1]
        return sign_variant(
            data,
            fmt,
            Ingredient(master, png, "png"),
            prov.signer,
            image_id=metadata.image_id,
            generator_version=prov.generator_version,
            title=f"{master.removesuffix('.png')}.{'jpg' if fmt == 'jpeg' else fmt}",
            watermarked=False,
            rights=prov.rights,
            watermark_payload=watermark.payload_for(metadata.image_id)
            if prov.watermark and watermark.can_embed(*image.size)
            else "",
        )

    def read_image(self, image_id: str) -> bytes:
        """A served image's master file by id (the `url` that OpenAI-style responses point at)."""
        if not IMAGE_ID.match(image_id):
            raise RequestError(404, "image_id", "not an image id")
        from app.stages import image_path

        try:
            return self.output.read_bytes(image_path(image_id))
        except OSError:
            raise RequestError(404, "image_id", f"no image {image_id}") from None
