"""The Serve app's logic without Ray: requests in, RenderRequests out; rendered pixels in, QC'd,
post-processed, catalogued images out. `app/serve/app.py` only wires this to Ray Serve.

All three HTTP dialects (native, OpenAI, AUTOMATIC1111) are translated into one `ImageJob`, so
limits, model checks and the catalog are the same whichever door a request came through.

When CLIP runs on the generator (`QcSettings.clip_runs_on_generator`, decided in `build_app`), a
replica's `rendered_rows` carry each image's CLIP measures and `ServeCore(clip_on_generator=True)`
grades them without loading CLIP.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from app.expand import ResolvedModels, RowError, build_request, lora_stack
from app.models.catalog import ModelCatalog
from app.models.digest import ModelFileError
from app.qc.clip_measures import measure_columns
from app.request import RenderRequest
from app.schedulers import SCHEDULERS
from app.serve.config import ServeConfig
from app.spec import Size, size_problem
from app.stages import CatalogWrite, Postprocess, QualityControl
from app.storage import OutputStore

A1111_SAMPLERS = {v[2]: k for k, v in reversed(list(SCHEDULERS.items()))}  # "Euler a" -> euler_a
_LORA_TAG = re.compile(r"<lora:([^:<>]+):([^:<>]+)(?::[^<>]*)?>")
IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")


class RequestError(Exception):
    """A request that cannot be served: HTTP status, the field at fault and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


@dataclass
class ImageJob:
    """One HTTP request, whatever its dialect: n images of one prompt."""

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


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111 prompt syntax: 'a cat <lora:style:0.8>' -> ('a cat', [('style', 0.8)])."""
    loras = []
    for name, weight in _LORA_TAG.findall(prompt):
        try:
            loras.append((name.strip(), float(weight)))
        except ValueError:
            raise RequestError(422, "prompt", f"LoRA tag weight {weight!r} of '{name}' is not a number") from None
    return " ".join(_LORA_TAG.sub(" ", prompt).split()), loras


def resolve_serve_models(config: ServeConfig) -> ResolvedModels:
    """Every base of the configured combinations, and every catalog LoRA usable with them.

    Requests may name any catalog LoRA (A1111 `<lora:…>` tags), so all are checked at start-up;
    one that cannot be used is recorded and requests for it get a 4xx naming why.
    """
    catalog = ModelCatalog.load(config.models_catalog)
    bases, loras, problems = {}, {}, {}
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


def rendered_rows(requests: list[RenderRequest], results: list, accelerator: str, clip=None) -> list[dict]:
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
                "accelerator": accelerator,
                "pixels": b"" if r.pixels is None else r.pixels.tobytes(),
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
        self.post = Postprocess(config.postprocess, self.output)
        self.write = CatalogWrite(self.output, self.run_id, source="serve")

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

    # --- requests -> render requests ------------------------------------------------------------
    def plan(self, job: ImageJob) -> list[RenderRequest]:
        lim = self.config.limits
        prompt = " ".join((job.prompt or "").split())
        if not prompt:
            raise RequestError(422, "prompt", "is empty")
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
        if "steps" in updates and not 1 <= updates["steps"] <= lim.max_steps:
            raise RequestError(422, "steps", f"{updates['steps']} is outside 1..{lim.max_steps}")
        if "guidance" in updates and not 0 <= updates["guidance"] <= 50:
            raise RequestError(422, "guidance", f"{updates['guidance']} is outside 0..50")
        if "scheduler" in updates and updates["scheduler"] not in SCHEDULERS:
            raise RequestError(
                422, "scheduler", f"unknown scheduler '{updates['scheduler']}' (valid: {', '.join(SCHEDULERS)})"
            )
        combo = combo.model_copy(update=updates) if updates else combo
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
        return [
            build_request(
                prompt=prompt,
                negative_prompt=job.negative_prompt or "",
                base=base,
                loras=loras,
                combo=combo,
                combination=name,
                width=width,
                height=height,
                seed=first + k,
                tags=tags,
                tier="serve",
                row_key=prompt[:80],
                variation=k,
            )
            for k in range(job.n)
        ]

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
            "request": np.asarray([q.to_json() for q in requests], dtype=object),
            "combination": np.asarray([q.combination_key for q in requests], dtype=object),
            "pixels": col("pixels", b""),
            "nonfinite": col("nonfinite_fraction", 0.0, np.float64),
            "gpu_seconds": col("gpu_seconds", 0.0, np.float64),
            "accelerator": col("accelerator", ""),
            "batch_id": col("batch_id", ""),
            "batch_size": col("batch_size", 0, np.int32),
            **{name: col(name, empty) for name, empty in measure_columns(None).items()},
        }
        post = self.post(self.qc(batch))
        self.write(post)
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
                )
            )
        return out

    def read_image(self, image_id: str) -> bytes:
        """A served image's master file by id (the `url` that OpenAI-style responses point at)."""
        if not IMAGE_ID.match(image_id):
            raise RequestError(404, "image_id", "not an image id")
        from app.stages import image_path

        try:
            return self.output.read_bytes(image_path(image_id))
        except OSError:
            raise RequestError(404, "image_id", f"no image {image_id}") from None
