"""Expand input rows into render requests: rows x matrix x variations (seeds).

`ExpandRows` is a plain callable over Arrow batches (the first Ray Data stage). A row that cannot
become a request (empty prompt, a template value missing, a bad size, an unknown LoRA) becomes a
`failed` request with the reason: it is written to the catalog, and the other rows go on. So does a
prompt with a term of `screening.prompt_terms` (reason `prompt_blocked: <terms>`), before any
rendering.

Columns a row may carry besides the template's own (all optional):
  prompt / <input.prompt_column>   the prompt, when the spec has no template
  negative_prompt / <input.negative_column>
  seed                              first seed of this row's variations
  width, height                     a size other than the spec's
  loras                             "name:weight, name:weight" replacing the spec's LoRA stack
  image, mask, mode, strength, target
                                    image-conditioned generation (the spec's `image` section names
                                    these columns): the input image's path or URI, its mask, the
                                    row's mode, strength and outpainting target

An image-conditioned row reads its input here (within `image.max_bytes` / `max_pixels`) and is
planned (app/conditioning/plan.py): its sha256 goes into the image_id, and an input that cannot be
used (missing, unreadable, a mask of another size, a mask that keeps all or nothing, too large…)
fails the row with `bad_input: <reason>: …` before anything renders. A row fans out into one
request per outpainting target x strength.

`input.matrix` crosses each row with lists of values: the row expands once per combination, the
values joining it as template variables and tags (so, with derived seeds, each combination's prompt
and seeds differ).

Its output is the plan's columns (`OUTPUT_SCHEMA`): the request is a typed struct
(`app.request.REQUEST_TYPE`), not text each later stage parses again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import SupportsFloat, SupportsIndex

import pyarrow as pa

from app.conditioning.errors import ConditioningError
from app.conditioning.loading import InputImage, InputLimits
from app.conditioning.plan import ModeSettings, Planned, load_inputs, plan_request
from app.models.catalog import ResolvedModel
from app.request import MODES, REQUEST_TYPE, Conditioning, LoraRef, RenderRequest, failed_row_id, requests_to_arrow
from app.spec import Combination, ImageSpec, JobSpec, size_problem, template_fields

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("status", pa.string()),  # pending | failed
        ("error", pa.string()),
        ("combination", pa.string()),  # the combination key: rows with the same one share a LoRA stack
        ("request", REQUEST_TYPE),
    ]
)
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)


class RowError(ValueError):
    """Why one input row cannot be rendered."""


class PromptBlocked(RowError):
    """A prompt with a term of `screening.prompt_terms`: the row fails with the terms as its reason."""


def parse_lora_list(text: str) -> list[tuple[str, float]]:
    """'style:0.8, detail' -> [('style', 0.8), ('detail', 1.0)]."""
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise RowError(f"LoRA weight {weight.strip()!r} of '{name.strip()}' is not a number") from None
        if not -4.0 <= w <= 4.0 or math.isnan(w):
            raise RowError(f"LoRA weight {w} of '{name.strip()}' is outside -4..4")
        out.append((name.strip(), w))
    return out


@dataclass(frozen=True)
class ResolvedModels:
    """What the driver resolved and checked before the job: every base and LoRA it may use."""

    bases: dict[str, ResolvedModel]
    loras: dict[str, ResolvedModel] = field(default_factory=dict)
    known_loras: tuple[str, ...] = ()  # every LoRA name in the catalog, for error messages
    lora_problems: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be used

    @classmethod
    def single(cls, base: ResolvedModel, **kw) -> ResolvedModels:
        return cls(bases={base.name: base}, **kw)


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _as_int(v: str | SupportsFloat | SupportsIndex | None, what: str) -> int:
    if v is None:
        raise RowError(f"{what} {v!r} is not a number")
    try:
        f = float(v)  # CSV gives strings; Parquet may give floats
    except (TypeError, ValueError, OverflowError):
        raise RowError(f"{what} {v!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):  # int(inf) would raise OverflowError
        raise RowError(f"{what} {v!r} is not a whole number")
    return int(f)


def lora_stack(wanted: list[tuple[str, float]], models: ResolvedModels, base: ResolvedModel) -> tuple[LoraRef, ...]:
    """Names and weights -> the LoRA lineage of a request; RowError for a name that cannot be used."""
    names = [n for n, _ in wanted]
    if len(set(names)) != len(names):
        raise RowError(f"a LoRA is listed twice in {names}")
    out = []
    for name, weight in wanted:
        if name in models.lora_problems:
            raise RowError(models.lora_problems[name])
        lo = models.loras.get(name)
        if lo is None:
            raise RowError(f"unknown LoRA '{name}' (known: {', '.join(models.known_loras)})")
        if lo.arch != base.arch:
            raise RowError(f"LoRA '{name}' was made for architecture {lo.arch}, but base '{base.name}' is {base.arch}")
        if not -4.0 <= weight <= 4.0 or math.isnan(weight):
            raise RowError(f"LoRA weight {weight} of '{name}' is outside -4..4")
        out.append(LoraRef(name=lo.name, version=lo.version, weight=float(weight), sha256=lo.sha256, source=lo.source))
    return tuple(out)


def build_request(
    *,
    prompt: str,
    negative_prompt: str,
    base: ResolvedModel,
    loras: tuple[LoraRef, ...],
    combo: Combination,
    combination: str,
    width: int,
    height: int,
    seed: int,
    template: dict | None = None,
    variables: dict | None = None,
    tags: dict | None = None,
    tier: str = "default",
    row_key: str = "",
    variation: int = 0,
    conditioning: Conditioning | None = None,
) -> RenderRequest:
    """One RenderRequest with its image_id: the one place both entrances (bulk, Serve) make them."""
    if combo.scheduler is None or combo.steps is None or combo.guidance is None:
        raise ValueError(f"combination '{combination}' has unset steps, guidance or scheduler: fill them in first")
    fuse = combo.fuse_loras and bool(loras)
    if conditioning is not None and int(combo.steps * conditioning.strength) < 1:
        raise RowError(
            f"strength {conditioning.strength:g} x {combo.steps} steps leaves no denoising step: raise either"
        )
    request = RenderRequest(
        image_id="",
        prompt=prompt,
        negative_prompt=negative_prompt,
        base_model=base.lineage(),
        loras=loras,
        scheduler=combo.scheduler,
        steps=combo.steps,
        guidance=combo.guidance,
        width=width,
        height=height,
        seed=seed,
        template=template or {},
        variables=variables or {},
        tags=tags or {},
        tier=tier,
        row_key=row_key,
        variation=variation,
        combination=combination,
        fuse_loras=fuse,
        conditioning=conditioning,
    )
    # The id is the hash of the fields above; the row group the same without the seed.
    return replace(request, image_id=request.pixel_id(), row_group=request.row_group_id())


class ImageInputs:
    """Input images of image-conditioned rows: read, checked and planned, with the last few kept
    (a row's variations and combinations read its image once)."""

    def __init__(self, image: ImageSpec, keep: int = 8):
        self.spec = image
        self.limits = InputLimits(max_bytes=image.max_bytes, max_pixels=image.max_pixels)
        self.keep = keep
        self._loaded: dict[tuple[str, str], tuple[InputImage, InputImage | None]] = {}

    def mode(self, raw: dict) -> str:
        value = raw.get(self.spec.mode_column)
        if _missing(value) or not str(value).strip():
            return self.spec.mode
        mode = str(value).strip().lower()
        if mode not in MODES:
            raise RowError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        return mode

    def plans(self, raw: dict, mode: str, width: int, height: int) -> list[Planned]:
        """One plan per target x strength of this row (RowError when an input cannot be used)."""
        image_uri = self._text(raw, self.spec.column)
        if not image_uri:
            raise RowError(f"mode {mode} needs an input image: column '{self.spec.column}' is empty or missing")
        mask_uri = self._text(raw, self.spec.mask_column)
        strengths: tuple[float | None, ...] = self.spec.strengths
        if not _missing(raw.get(self.spec.strength_column)) and str(raw.get(self.spec.strength_column)).strip():
            strengths = (_as_float(raw[self.spec.strength_column], "strength"),)
        targets: tuple[str, ...] = ("",)
        if mode == "outpaint":
            targets = (self._text(raw, self.spec.target_column),) if self._text(raw, self.spec.target_column) else ()
            targets = targets or self.spec.targets
            if not targets:
                raise RowError(f"mode outpaint needs a target: column '{self.spec.target_column}' or image.targets")
        s = self.spec
        try:
            image, mask = self._load(image_uri, mask_uri)
            return [
                plan_request(
                    ModeSettings(
                        mode=mode,
                        strength=strength,
                        mask_blur=s.mask_blur,
                        blend_px=s.blend_px,
                        target=target,
                        anchor=s.anchor,
                        fill=s.fill,
                        resize_mode=s.resize_mode,
                        scale=s.scale,
                        tile=s.tile,
                        tile_overlap=s.tile_overlap,
                    ),
                    image,
                    mask,
                    width,
                    height,
                )
                for target in targets
                for strength in strengths
            ]
        except ConditioningError as e:
            raise BadInput(str(e)) from None

    def _load(self, image_uri: str, mask_uri: str) -> tuple[InputImage, InputImage | None]:
        key = (image_uri, mask_uri)
        if key not in self._loaded:
            if len(self._loaded) >= self.keep:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[key] = load_inputs(image_uri, mask_uri, self.spec.base_dir, self.limits)
        return self._loaded[key]

    @staticmethod
    def _text(raw: dict, column: str) -> str:
        value = raw.get(column)
        return "" if _missing(value) else str(value).strip()


class BadInput(RowError):
    """An input image or mask that cannot be used: the row fails with `bad_input: <reason>: …`."""


def _as_float(v: object, what: str) -> float:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RowError(f"{what} {v!r} is not a number") from None
    if not math.isfinite(f):
        raise RowError(f"{what} {v!r} is not a finite number")
    return f


class _KeepPlaceholders(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class ExpandRows:
    """Input rows (Arrow) -> request rows in `OUTPUT_SCHEMA`: image_id, status ('pending'|'failed'),
    error, combination (rows with the same one share a loaded LoRA stack), request (a struct; a
    failed row's holds what can still be said about it)."""

    def __init__(self, spec: JobSpec, models: ResolvedModels):
        self.spec = spec
        self.models = models
        self.combos: dict[str, Combination] = spec.effective_combinations()
        self.fields = template_fields(spec.input.prompt_template) if spec.input.prompt_template else []
        self.screen = spec.screening.prompt_screen()  # None: prompts are not screened
        self.inputs = ImageInputs(spec.image)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}

        def emit(*row):
            for col, value in zip(OUTPUT_COLUMNS, row):
                out[col].append(value)

        v = self.spec.variations
        # A quota's attempts are all expanded (their ids are fixed); a row that cannot become a
        # request fails once per image it was asked for, not once per possible attempt.
        failed_rows = v.accepted_per_row or v.seeds_per_row
        matrix = self.spec.input.matrix_rows
        for row in batch.to_pylist():
            for raw in ({**row, **values} for values in matrix):
                for i in range(v.attempts_per_row):
                    try:
                        for req in self.requests(raw, i):
                            emit(req.image_id, "pending", "", req.combination_key, req)
                    except RowError as e:
                        if i >= failed_rows:
                            continue
                        kind = "bad_input" if isinstance(e, BadInput) else "bad_row"
                        reason = str(e) if isinstance(e, PromptBlocked) else f"{kind}: {e}"
                        emit(failed_row_id(raw, i), "failed", reason, "", self._partial(raw, i))
        return pa.table({**out, "request": requests_to_arrow(out["request"])}, schema=OUTPUT_SCHEMA)

    def routes(self, raw: dict) -> list[tuple[str, str]]:
        """(combination, tier) pairs a row is rendered through."""
        spec = self.spec
        if spec.ab_test:
            return [(name, "ab") for name in spec.ab_test.combinations]
        tier = spec.default_tier
        col = spec.tiers.column
        if col and col in raw and not _missing(raw[col]) and str(raw[col]).strip():
            tier = str(raw[col]).strip()
        name = spec.tiers.routes.get(tier, tier)
        if name not in self.combos:
            raise RowError(
                f"tier '{tier}' names no combination (tiers: {', '.join(sorted(spec.tiers.routes)) or '-'}; "
                f"combinations: {', '.join(sorted(self.combos))})"
            )
        return [(name, tier)]

    def requests(self, raw: dict, variation: int) -> list[RenderRequest]:
        """Every request of one row's variation: one, or one per combination of an A/B test."""
        reqs = [r for name, tier in self.routes(raw) for r in self.request(raw, variation, name, tier)]
        if self.spec.ab_test:
            # Same prompt and seed in every combination; the tag links them for comparison.
            group = hashlib.sha256(f"{reqs[0].prompt}\0{reqs[0].seed}\0{reqs[0].row_key}".encode()).hexdigest()[:16]
            reqs = [RenderRequest(**{**r.__dict__, "tags": {**r.tags, "ab_group": group}}) for r in reqs]
        return reqs

    # ---------------------------------------------------------------------------------------------
    def request(
        self, raw: dict, variation: int, combination: str = "default", tier: str = "default"
    ) -> list[RenderRequest]:
        """The row's request in one combination: one, or one per target x strength of an
        image-conditioned row."""
        spec, inp = self.spec, self.spec.input
        combo = self.combos[combination]
        base = self.models.bases[combo.base]
        variables = {}
        if inp.prompt_template is not None:
            for name in self.fields:
                if name not in raw:
                    raise RowError(f"template column '{name}' is not in the row (columns: {', '.join(raw)})")
                if _missing(raw[name]) or str(raw[name]).strip() == "":
                    raise RowError(f"template column '{name}' is empty in this row")
                variables[name] = str(raw[name]).strip()
            prompt = inp.prompt_template.format(**variables)
        else:
            value = raw.get(inp.prompt_column)
            prompt = "" if _missing(value) else str(value)
        prompt = " ".join(prompt.split())
        if not prompt:
            raise RowError("empty prompt")
        if self.screen is not None and (blocked := self.screen.reason(prompt)):
            raise PromptBlocked(blocked)  # before rendering: the row fails with the terms found
        negative = spec.negative_prompt
        neg_col = inp.negative_column or "negative_prompt"
        if neg_col in raw and not _missing(raw[neg_col]) and str(raw[neg_col]).strip():
            negative = str(raw[neg_col]).strip()

        width, height = spec.size.width, spec.size.height
        if "width" in raw and not _missing(raw["width"]):
            width = _as_int(raw["width"], "width")
        if "height" in raw and not _missing(raw["height"]):
            height = _as_int(raw["height"], "height")
        problem = size_problem(width, height)
        if problem:
            raise RowError(problem)
        mode = self.inputs.mode(raw)
        plans: list[Planned | None] = [None]
        if mode != "txt2img":
            plans = list(self.inputs.plans(raw, mode, width, height))

        loras = self._loras(raw, combo, base)
        seed = self._seed(raw, prompt, negative, variation)
        tags = dict(spec.static_tags)
        for col in (*spec.tags, *inp.matrix):
            if col in raw and not _missing(raw[col]):
                tags[col] = str(raw[col])
        return [
            build_request(
                prompt=prompt,
                negative_prompt=negative,
                base=base,
                loras=loras,
                combo=combo,
                combination=combination,
                width=width if plan is None else plan.width,
                height=height if plan is None else plan.height,
                seed=seed,
                template=self._template(),
                variables=variables,
                tags=tags,
                tier=tier,
                row_key=self._row_key(raw, prompt),
                variation=variation,
                conditioning=None if plan is None else plan.conditioning,
            )
            for plan in plans
        ]

    def _loras(self, raw: dict, combo: Combination, base: ResolvedModel) -> tuple[LoraRef, ...]:
        if "loras" in raw and not _missing(raw["loras"]) and str(raw["loras"]).strip():
            wanted = parse_lora_list(str(raw["loras"]))
        else:
            wanted = [(lo.name, lo.weight) for lo in combo.loras]
        return lora_stack(wanted, self.models, base)

    def _seed(self, raw: dict, prompt: str, negative: str, variation: int) -> int:
        v = self.spec.variations
        if "seed" in raw and not _missing(raw["seed"]):
            first = _as_int(raw["seed"], "seed")
            if not 0 <= first < 2**63 - v.attempts_per_row:
                raise RowError(f"seed {first} is outside 0..2^63-1")
            return first + variation
        if v.seed_mode == "fixed":
            return v.seeds[variation] if v.seeds else v.base_seed + variation
        # Derived from the prompt, so adding or reordering rows never changes another row's seeds.
        h = hashlib.sha256(f"{v.base_seed}\0{prompt}\0{negative}\0{variation}".encode()).digest()
        return int.from_bytes(h[:8], "big") >> 1

    def _template(self) -> dict:
        inp = self.spec.input
        if inp.prompt_template is None:
            return {}
        version = hashlib.sha256(inp.prompt_template.encode()).hexdigest()[:12]
        return {"name": inp.template_name or "inline", "version": version, "text": inp.prompt_template}

    def _row_key(self, raw: dict, prompt: str) -> str:
        key_col = self.spec.input.key_column
        if key_col and key_col in raw and not _missing(raw[key_col]):
            return str(raw[key_col])
        return prompt[:80]

    def _partial(self, raw: dict, variation: int) -> RenderRequest:
        """What a failed row's catalog entry can still say about it (no LoRAs, seed 0)."""
        tags = dict(self.spec.static_tags)
        tagged = (*self.spec.tags, *self.spec.input.matrix)
        tags.update({c: str(raw[c]) for c in tagged if c in raw and not _missing(raw[c])})
        template = self.spec.input.prompt_template
        if template is not None:
            # What the prompt would have been, with the unusable placeholders left in.
            values = {k: str(v).strip() for k, v in raw.items() if not _missing(v) and str(v).strip()}
            prompt = template.format_map(_KeepPlaceholders(values))
        else:
            value = raw.get(self.spec.input.prompt_column)
            prompt = "" if _missing(value) else str(value)
        return RenderRequest(
            image_id=failed_row_id(raw, variation),
            prompt=prompt,
            negative_prompt=self.spec.negative_prompt,
            template=self._template(),
            variables={k: ("" if _missing(v) else str(v)) for k, v in raw.items() if k in self.fields},
            tags=tags,
            base_model=next(iter(self.models.bases.values())).lineage(),
            loras=(),
            scheduler=self.spec.scheduler,
            steps=self.spec.steps,
            guidance=self.spec.guidance,
            width=self.spec.size.width,
            height=self.spec.size.height,
            seed=0,
            row_key=self._row_key(raw, "" if _missing(prompt) else str(prompt)),
            variation=variation,
            conditioning=self._partial_conditioning(raw),
        )

    def _partial_conditioning(self, raw: dict) -> Conditioning | None:
        """A failed image-conditioned row's input as the row named it (nothing was read)."""
        try:
            mode = self.inputs.mode(raw)
        except RowError:
            mode = str(raw.get(self.spec.image.mode_column))
        image_uri = ImageInputs._text(raw, self.spec.image.column)
        if mode == "txt2img" or not image_uri:
            return None
        return Conditioning(
            mode=mode,
            image_uri=image_uri,
            image_sha256="",
            mask_uri=ImageInputs._text(raw, self.spec.image.mask_column),
        )
