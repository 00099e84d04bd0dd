"""The job spec: one validated, frozen object from the YAML file to every stage.

`load_spec(path)` reads a YAML spec and raises `SpecError` naming the field path and the bad value
("model.loras[1].weight: 7.0 — must be between -4 and 4"). Relative input paths and catalogs are
resolved against the spec file's folder, so a spec runs the same from any working directory.
"""

from __future__ import annotations

import itertools
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.compute import ComputeSpec
from app.postprocess import PostprocessSettings
from app.provenance.settings import ProvenanceSettings, RightsSpec, ScreeningSettings
from app.qc import QcSettings
from app.request import LoraRef
from app.storage import DEFAULT_OUTAGE_WAIT_S, is_uri

# SDXL was trained on ~1 megapixel buckets; these are its usual sizes, plus small ones for the
# offline tiny model on CPU.
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "sdxl-square": (1024, 1024),
    "sdxl-portrait": (896, 1152),
    "sdxl-landscape": (1152, 896),
    "sdxl-tall": (768, 1344),
    "sdxl-wide": (1344, 768),
    "sdxl-ultrawide": (1536, 640),
    "small-square": (512, 512),
    "tiny-square": (256, 256),
    "tiny-portrait": (192, 256),
}
MIN_SIDE, MAX_SIDE = 64, 4096

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A spec that cannot run; the message names the field path and the bad value.

    `problems` lists (field path, what is wrong) for each error of a spec that failed
    validation, for tools that want them apart (`imagefab validate --json`)."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def size_problem(width: int, height: int) -> str | None:
    """Why a generation size cannot be rendered, or None when it can."""
    if width % 8 or height % 8:
        return f"width and height have to be divisible by 8 but are {width} and {height}"
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        return f"size {width}x{height} is outside {MIN_SIDE}..{MAX_SIDE} pixels per side"
    return None


def template_fields(template: str) -> list[str]:
    """The column names a `{column}` template uses; raises ValueError when it is malformed."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"malformed prompt template {template!r}: {e}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() and not name.replace("-", "_").replace(" ", "_").isidentifier():
            raise ValueError(f"template placeholder {{{name}}} is not a column name (in {template!r})")
        if spec or conv:
            raise ValueError(f"template placeholder {{{name}}} may not carry a format spec (in {template!r})")
        names.append(name)
    return names


class Size(_Frozen):
    width: int
    height: int

    @model_validator(mode="after")
    def _renderable(self) -> Size:
        problem = size_problem(self.width, self.height)
        if problem:
            raise ValueError(problem)
        return self

    @classmethod
    def parse(cls, value: Any) -> Size:
        """`sdxl-square`, `1024x768`, or {width, height}."""
        if isinstance(value, str):
            if value in SIZE_PRESETS:
                w, h = SIZE_PRESETS[value]
                return cls(width=w, height=h)
            m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
            if not m:
                raise ValueError(f"'{value}' is neither WIDTHxHEIGHT nor a size preset ({', '.join(SIZE_PRESETS)})")
            return cls(width=int(m[1]), height=int(m[2]))
        if isinstance(value, dict):
            return cls.model_validate(value)  # not cls(**value): YAML keys may be numbers
        if isinstance(value, Size):
            return value
        raise ValueError(f"expected a preset name, 'WIDTHxHEIGHT' or {{width, height}}, got {value!r}")


class InputSpec(_Frozen):
    """Where the prompts come from. CSV rows are expanded through `prompt_template`.

    `matrix` crosses every row with named lists of values (`{scene: [kitchen, café, beach]}`):
    a row expands once per combination, each value a template variable and a tag of its images.
    Every matrix name must be a placeholder of the template (otherwise its combinations would be
    the same image), and no input column may share its name (checked with the input's columns)."""

    path: str
    format: Literal["auto", "csv", "parquet"] = "auto"
    prompt_template: str | None = None
    template_name: str | None = None
    prompt_column: str = "prompt"
    negative_column: str | None = None
    key_column: str | None = None  # names rows in errors and the catalog (e.g. product_id)
    limit: int | None = Field(None, ge=1)
    matrix: dict[str, tuple[str, ...]] = {}  # name -> values; every row x every combination

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = self.path.lower().rsplit(".", 1)[-1]
        if suffix in ("csv", "tsv"):
            return "csv"
        return "parquet"

    @property
    def delimiter(self) -> str:
        return "\t" if self.path.lower().endswith(".tsv") else ","

    @field_validator("prompt_template")
    @classmethod
    def _balanced(cls, t: str | None) -> str | None:
        if t is not None:
            template_fields(t)  # raises ValueError on a malformed placeholder
            if not t.strip():
                raise ValueError("prompt_template is empty")
        return t

    @field_validator("matrix", mode="before", json_schema_input_type=dict[str, list[str | int | float]])
    @classmethod
    def _matrix_values_as_text(cls, matrix: Any) -> Any:
        # `size: [1, 2]` in YAML gives numbers; template variables and tags are text.
        if isinstance(matrix, dict):
            return {
                k: [str(x) if isinstance(x, (int, float)) else x for x in v] if isinstance(v, list) else v
                for k, v in matrix.items()
            }
        return matrix

    @model_validator(mode="after")
    def _matrix_fits_template(self) -> InputSpec:
        if not self.matrix:
            return self
        if self.prompt_template is None:
            raise ValueError("matrix: its values are template variables; give `prompt_template` that uses them")
        used = set(template_fields(self.prompt_template))
        for name, values in self.matrix.items():
            if not name.isidentifier():
                raise ValueError(f"matrix: {name!r} is not a name a template placeholder can use")
            if not values:
                raise ValueError(f"matrix.{name}: an empty list; give one or more values, or drop '{name}'")
            blank = [v for v in values if not v.strip()]
            if blank:
                raise ValueError(f"matrix.{name}: an empty value in {list(values)}")
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"matrix.{name}: {repeated} listed twice (each value gives its own images)")
            if name not in used:
                raise ValueError(
                    f"matrix.{name}: not a placeholder of prompt_template {self.prompt_template!r}; "
                    f"without {{{name}}} in the prompt its {len(values)} values would render the same image"
                )
        return self

    @property
    def matrix_rows(self) -> list[dict[str, str]]:
        """Every combination of the matrix values, in the order given ([{}] without a matrix)."""
        names = list(self.matrix)
        return [dict(zip(names, values)) for values in itertools.product(*self.matrix.values())]


class Variations(_Frozen):
    """How many images each input row gives, and their seeds."""

    seeds_per_row: int = Field(1, ge=1, le=10_000)
    # derived: seed = hash(base_seed, prompt, i), stable when rows are added or reordered;
    # fixed: seeds = `seeds`, or base_seed + i.
    seed_mode: Literal["derived", "fixed"] = "derived"
    base_seed: int = Field(0, ge=0, lt=2**63)
    seeds: tuple[int, ...] = ()
    # A quota instead of a count (app/quota.py): render until each row has this many accepted
    # images or `max_attempts_per_row` attempts are spent. Attempt i has variation i's seed.
    accepted_per_row: int | None = Field(None, ge=1, le=1_000)
    max_attempts_per_row: int | None = Field(None, ge=1, le=10_000)  # default: 3 x accepted_per_row
    review_counts_as_accepted: bool = False  # images waiting for review count towards the quota

    @model_validator(mode="after")
    def _seeds_fit(self) -> Variations:
        if self.accepted_per_row is None:
            for name in ("max_attempts_per_row", "review_counts_as_accepted"):
                if getattr(self, name) not in (None, False):  # their defaults, as a dumped spec holds them
                    raise ValueError(f"`{name}` needs `accepted_per_row` (how many accepted images each row wants)")
        else:
            if self.seeds_per_row != 1:
                raise ValueError(
                    f"give `seeds_per_row` ({self.seeds_per_row}) or `accepted_per_row` "
                    f"({self.accepted_per_row}), not both: a quota renders as many seeds as it needs"
                )
            if self.attempts_per_row < self.accepted_per_row:
                raise ValueError(
                    f"max_attempts_per_row ({self.attempts_per_row}) is below accepted_per_row "
                    f"({self.accepted_per_row}): the quota could never be met"
                )
        if self.seeds and self.seed_mode != "fixed":
            raise ValueError("`seeds` is only used with seed_mode: fixed")
        if self.seeds and len(self.seeds) != self.attempts_per_row:
            what = "max_attempts_per_row" if self.accepted_per_row else "seeds_per_row"
            raise ValueError(f"`seeds` lists {len(self.seeds)} seeds but {what} is {self.attempts_per_row}")
        if any(s < 0 or s >= 2**63 for s in self.seeds):
            raise ValueError("seeds must be in 0..2^63-1")
        return self

    @property
    def attempts_per_row(self) -> int:
        """Requests expanded per row: every attempt a quota may make, or `seeds_per_row`."""
        if self.accepted_per_row is None:
            return self.seeds_per_row
        return self.max_attempts_per_row or min(10_000, 3 * self.accepted_per_row)


class BudgetSpec(_Frozen):
    """Caps on one run (app/budget.py): it stops starting new batches when the next would cross
    one, finishes what is in flight, and says so in its summary and catalog."""

    max_cost_usd: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    max_device_seconds: float | None = Field(None, ge=0.0, allow_inf_nan=False)

    @property
    def active(self) -> bool:
        return self.max_cost_usd is not None or self.max_device_seconds is not None


Mode = Literal["txt2img", "img2img", "inpaint", "outpaint", "upscale"]


class ImageSpec(_Frozen):
    """Image-conditioned generation: each row's input image (and mask), and how it is used.

    `mode` is the run's mode; a row's `mode_column` value overrides it. `targets` (outpaint) and a
    list of `strength`s fan a row out: one image per target x strength. Paths in the image and
    mask columns are relative to the spec file's folder (`base_dir`, set when the spec is loaded)
    unless absolute or a URI (`s3://…`)."""

    mode: Mode = "txt2img"
    column: str = "image"
    mask_column: str = "mask"
    mode_column: str = "mode"
    strength_column: str = "strength"
    target_column: str = "target"
    # None: the mode's default (img2img 0.6, inpaint and outpaint 1.0, upscale 0.3); a list: one image each
    strength: float | tuple[float, ...] | None = None
    mask_blur: int = Field(4, ge=0, le=64)  # px of blur on the mask the model sees (A1111's Mask blur)
    blend_px: int = Field(4, ge=0, le=64)  # the feathered band inside the kept region along the seam
    targets: tuple[str, ...] = ()  # outpaint: ratios (9:16), sizes (1080x1920) or platforms (tiktok)
    anchor: str = "center"  # outpaint: where the original sits on the canvas
    fill: Literal["edge", "reflect", "mean"] = "edge"  # outpaint: the new area's initial fill
    resize_mode: Literal["crop", "fill", "stretch"] = "crop"  # img2img: the input meets the render size
    scale: float = Field(2.0, ge=1.0, le=8.0)  # upscale factor
    tile: int = Field(1024, ge=64, le=4096)  # upscale: tile side
    tile_overlap: int = Field(128, ge=0, le=2048)
    max_bytes: int = Field(50 * 2**20, ge=1)  # per input file
    max_pixels: int = Field(40_000_000, ge=1)  # per input image, from its header before decoding
    base_dir: str | None = None  # the folder relative image paths start from

    @field_validator("strength")
    @classmethod
    def _strengths(cls, v: float | tuple[float, ...] | None) -> float | tuple[float, ...] | None:
        for s in () if v is None else v if isinstance(v, tuple) else (v,):
            if not 0.0 < s <= 1.0:
                raise ValueError(f"strength {s} is outside (0, 1]")
        if isinstance(v, tuple) and not v:
            raise ValueError("strength: an empty list; give one or more strengths, or none for the default")
        return v

    @model_validator(mode="after")
    def _mode_needs(self) -> ImageSpec:
        if self.mode == "outpaint" and not self.targets:
            raise ValueError("mode outpaint needs `targets` (e.g. ['9:16', '4:5', '1.91:1'])")
        from app.conditioning.errors import ConditioningError
        from app.conditioning.outpaint import ANCHORS, parse_target

        for t in self.targets:
            try:
                parse_target(t)
            except ConditioningError as e:
                raise ValueError(f"targets: {e.detail}") from None
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor {self.anchor!r} is not one of {', '.join(ANCHORS)}")
        if self.tile % 8 or self.tile_overlap % 8 or self.tile_overlap > self.tile // 2:
            raise ValueError(
                f"tile ({self.tile}) and tile_overlap ({self.tile_overlap}) must be multiples of 8, overlap at most tile/2"
            )
        return self

    @property
    def strengths(self) -> tuple[float | None, ...]:
        """One image per strength; (None,) for the mode's default."""
        return self.strength if isinstance(self.strength, tuple) else (self.strength,)


class BackendFields(_Frozen):
    """Where a combination's pixels come from: imagefab's diffusers generator (the default) or a
    remote backend. The key is named by where it is (`env:VAR` / `file:/path`), never given."""

    backend: Literal["diffusers", "a1111", "stability", "openai"] = "diffusers"
    endpoints: tuple[str, ...] = ()
    provider_model: str | None = None  # a1111 checkpoint, stability core|ultra|sd3|sd3.5-…, openai model
    max_concurrency: int = Field(4, ge=1, le=256)  # requests in flight per remote actor
    remote_actors: int = Field(1, ge=1, le=64)  # CPU actors for the backend
    credentials: str | None = None
    price_usd_per_image: float | None = Field(None, ge=0.0)  # unset: the price table's default

    @model_validator(mode="after")
    def _backend_config(self):
        if self.backend != "diffusers":
            self.backend_config()  # raises ValueError naming the field
            if self.backend == "stability":
                from app.backends.stability import engine_and_model

                engine_and_model(self.provider_model)
        elif self.endpoints or self.credentials:
            raise ValueError("endpoints/credentials need a remote backend (a1111, stability, openai)")
        return self

    def backend_config(self):
        from app.backends.base import BackendConfig

        return BackendConfig(
            backend=self.backend,
            endpoints=self.endpoints,
            model=self.provider_model,
            max_concurrency=self.max_concurrency,
            credentials=self.credentials,
            price_usd_per_image=self.price_usd_per_image,
        )

    def backend_fields(self) -> dict:
        return {name: getattr(self, name) for name in BackendFields.model_fields}


class ModelSpec(BackendFields):
    base: str = "tiny-sdxl"
    loras: tuple[LoraRef, ...] = ()
    catalog: str | None = None  # a user model catalog YAML merged over the built-in one

    @field_validator("loras")
    @classmethod
    def _distinct(cls, loras: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
        names = [lo.name for lo in loras]
        if len(set(names)) != len(names):
            raise ValueError(f"a LoRA is listed twice in {names}")
        for lo in loras:
            pinned = [k for k in ("version", "sha256", "source") if getattr(lo, k)]
            if pinned:
                raise ValueError(
                    f"LoRA '{lo.name}' sets {', '.join(pinned)}: a spec names a LoRA and its weight; "
                    "the model catalog (or a models:/ reference) decides its version and file"
                )
        return loras


SchedulerName = Literal[
    "euler", "euler_a", "euler_trailing", "euler_a_trailing", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm"
]


class Combination(BackendFields):
    """A base model + ordered LoRA stack, with its own rendering defaults.

    Unset steps / guidance / scheduler fall back to the spec's top-level values. `fuse_loras`
    merges the stack into the weights for the combination's images (faster when a stack stays
    loaded for many images; the pixels differ from unfused in the last bits, so it is part of
    what decides an image)."""

    base: str = "tiny-sdxl"
    loras: tuple[LoraRef, ...] = ()
    steps: int | None = Field(None, ge=1, le=500)
    guidance: float | None = Field(None, ge=0.0, le=50.0)
    scheduler: SchedulerName | None = None
    fuse_loras: bool = False

    _distinct = field_validator("loras")(ModelSpec._distinct.__func__)  # type: ignore[attr-defined]


def with_defaults(
    combos: dict[str, Combination], steps: int, guidance: float, scheduler: str
) -> dict[str, Combination]:
    """Combinations with unset steps / guidance / scheduler taken from the given defaults."""
    return {
        name: c.model_copy(
            update={
                "steps": c.steps if c.steps is not None else steps,
                "guidance": c.guidance if c.guidance is not None else guidance,
                "scheduler": c.scheduler or scheduler,
            }
        )
        for name, c in combos.items()
    }


def check_compiled_stacks(combos: dict[str, Combination], compute: ComputeSpec, every: bool = False) -> None:
    """A compiled UNet renders LoRA stacks merged into its weights: switching them then changes
    no module, so nothing recompiles. Unfused adapters would recompile it for every stack.
    `every`: also combinations without LoRAs (Serve requests can add a stack to any)."""
    if not compute.compile:
        return
    unfused = [name for name, c in combos.items() if (c.loras or every) and not c.fuse_loras]
    if unfused:
        raise ValueError(
            f"compute.compile needs `fuse_loras: true` on every combination with LoRAs; not set on: "
            f"{', '.join(unfused)} (a compiled UNet would recompile for each unfused LoRA stack)"
        )


class Tiers(_Frozen):
    """Route rows to combinations by purpose: a tier per row (from `column`) -> a combination."""

    column: str | None = None  # the input column naming a row's tier (or a combination directly)
    default: str | None = None  # the tier of rows without one; None: the first combination
    routes: dict[str, str] = {}  # tier -> combination name; a tier not listed names a combination


class ABTest(_Frozen):
    """Render every row through each combination with the same seed, linked by an `ab_group` tag."""

    combinations: tuple[str, ...] = Field(min_length=2)


class OutputSpec(_Frozen):
    uri: str = "outputs"  # a local folder or any pyarrow filesystem URI (s3://, gs://)
    # An object store that stops answering is waited for this long before the job stops (app/storage.py).
    outage_wait_s: float = Field(DEFAULT_OUTAGE_WAIT_S, ge=0.0, le=24 * 3600)


class JobSpec(_Frozen):
    run_name: str
    input: InputSpec
    negative_prompt: str = ""
    variations: Variations = Variations()
    model: ModelSpec = ModelSpec()
    steps: int = Field(30, ge=1, le=500)
    guidance: float = Field(5.0, ge=0.0, le=50.0)
    scheduler: SchedulerName = "euler"
    size: Size = Size(width=1024, height=1024)
    # Named combinations; without any, `model` + steps/guidance/scheduler are the one called "default".
    combinations: dict[str, Combination] = {}
    tiers: Tiers = Tiers()
    ab_test: ABTest | None = None
    qc: QcSettings | str = QcSettings()  # settings, or qc:/NAME@ALIAS resolved before the job runs
    postprocess: PostprocessSettings = PostprocessSettings()
    output: OutputSpec = OutputSpec()
    tags: tuple[str, ...] = ()  # input columns copied into each image's tags
    static_tags: dict[str, str] = {}  # tags set on every image of the run (campaign, brand…)
    compute: ComputeSpec = ComputeSpec()
    provenance: ProvenanceSettings = ProvenanceSettings()  # C2PA manifests, invisible watermark
    rights: RightsSpec | None = None  # usage rights: catalog, XMP (IPTC) and the C2PA manifest
    screening: ScreeningSettings = ScreeningSettings()  # prompts checked before rendering
    image: ImageSpec = ImageSpec()  # img2img, inpaint, outpaint, upscale: the input images
    budget: BudgetSpec = BudgetSpec()  # cost and device-time caps on the run

    @field_validator("run_name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not RUN_NAME.match(name):
            raise ValueError(
                f"'{name}' is not a valid run name: letters, digits, '_', '.', '-', at most 64, starting alphanumeric"
            )
        return name

    @field_validator("qc")
    @classmethod
    def _qc_reference(cls, qc: QcSettings | str) -> QcSettings | str:
        if isinstance(qc, str) and not qc.startswith("qc:/"):
            raise ValueError(
                f"'{qc}' is neither QC settings nor a registry reference qc:/NAME@ALIAS or qc:/NAME/VERSION"
            )
        return qc

    # json_schema_input_type: what the YAML may say, for the JSON Schema (`imagefab spec schema`).
    @field_validator("size", mode="before", json_schema_input_type=str | Size)
    @classmethod
    def _size(cls, v: Any) -> Size:
        return Size.parse(v)

    @field_validator("static_tags", mode="before", json_schema_input_type=dict[str, str | int | float])
    @classmethod
    def _tag_values_as_text(cls, tags: Any) -> Any:
        # `year: 2026` in YAML is an int; tags are text in the catalog.
        if isinstance(tags, dict):
            return {k: str(v) if isinstance(v, (int, float)) else v for k, v in tags.items()}
        return tags

    @model_validator(mode="after")
    def _routes_exist(self) -> JobSpec:
        if self.combinations and self.model.model_fields_set & {"base", "loras"}:
            raise ValueError("model: give `model.base`/`model.loras` or `combinations`, not both")
        names = set(self.effective_combinations())
        shown = ", ".join(sorted(names))
        for tier, target in self.tiers.routes.items():
            if target not in names:
                raise ValueError(f"tiers.routes.{tier}: no combination '{target}' (combinations: {shown})")
        default = self.default_tier
        if self.tiers.routes.get(default, default) not in names:
            raise ValueError(f"tiers.default: '{default}' is neither a routed tier nor a combination ({shown})")
        for name in self.ab_test.combinations if self.ab_test else ():
            if name not in names:
                raise ValueError(f"ab_test.combinations: no combination '{name}' (combinations: {shown})")
        check_compiled_stacks(self.effective_combinations(), self.compute)
        return self

    @model_validator(mode="after")
    def _matrix_names_are_not_row_settings(self) -> JobSpec:
        # A matrix value joins each row like a column: under a name the expansion reads as a
        # setting (seed, mode, image…) it would change that instead of the prompt.
        inp, img = self.input, self.image
        settings = {
            *("seed", "width", "height", "loras", "negative_prompt", inp.prompt_column),
            *(inp.negative_column, inp.key_column, self.tiers.column),
            *(img.column, img.mask_column, img.mode_column, img.strength_column, img.target_column),
        }
        for name in inp.matrix:
            if name in settings:
                raise ValueError(
                    f"input.matrix.{name}: '{name}' is a column the expansion reads as a row setting; "
                    "give the matrix another name"
                )
        return self

    @property
    def qc_settings(self) -> QcSettings:
        """The QC settings; a `qc:/…` registry reference must have been resolved before."""
        if isinstance(self.qc, str):
            raise SpecError(f"qc: the registry reference {self.qc!r} has not been resolved")
        return self.qc

    @property
    def images_per_row(self) -> int:
        """Images an input row gives by the spec alone (a row's own mode, strength or target
        columns may change it): seeds (with a quota: the accepted images it asks for) x matrix
        combinations x outpainting targets x strengths x A/B combinations."""
        img, v = self.image, self.variations
        return (
            (v.accepted_per_row or v.seeds_per_row)
            * len(self.input.matrix_rows)
            * (len(img.targets) if img.mode == "outpaint" else 1)
            * (len(img.strengths) if img.mode != "txt2img" else 1)
            * (len(self.ab_test.combinations) if self.ab_test else 1)
        )

    @property
    def default_tier(self) -> str:
        return self.tiers.default or next(iter(self.combinations), "default")

    def effective_combinations(self) -> dict[str, Combination]:
        """Every combination with steps/guidance/scheduler filled in from the top level."""
        combos = dict(self.combinations) or {
            "default": Combination(base=self.model.base, loras=self.model.loras, **self.model.backend_fields())
        }
        return with_defaults(combos, self.steps, self.guidance, self.scheduler)

    def with_overrides(self, **changes: Any) -> JobSpec:
        """A copy with dotted-path overrides, validated again (`output.uri=/tmp/x`)."""
        data = self.model_dump(mode="json", exclude_unset=True)  # unset stays unset: defaults apply again
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise SpecError(f"overrides: {dotted}: '{p}' is a value, not a section with fields")
            node[leaf] = value
        return parse_spec(data, where="overrides")


def _problems(e: ValidationError) -> list[tuple[str, str]]:
    """(field path, message with the bad value) for each of pydantic's errors."""
    problems = []
    for err in e.errors():
        if err["type"] == "string_type" and isinstance(err.get("input"), dict):
            continue  # the `str` side of a "settings or reference" union: the settings error says it
        path = ""
        for part in err["loc"]:
            if isinstance(part, str) and (part.startswith("function-") or part[:1].isupper() or part == "str"):
                continue  # pydantic's union-member tags, not field names
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) or err["type"] == "missing" else f" (got {value!r})"
        problems.append((path, f"{msg}{shown}"))
    return problems


def _format_errors(e: ValidationError, where: str) -> str:
    lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in _problems(e)]
    return f"{where}: invalid spec\n" + "\n".join(lines)


def parse_spec(data: Any, where: str = "<spec>", base_dir: Path | None = None) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a spec is a YAML mapping, got {type(data).__name__}")
    if base_dir is not None:
        data = _anchor_paths(data, base_dir)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, where), _problems(e)) from None


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec ({e.strerror})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of more than 4300 digits
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    spec = parse_spec(data, where=str(path), base_dir=path.resolve().parent)
    return spec.with_overrides(**overrides) if overrides else spec


def _anchor_paths(data: dict, base_dir: Path) -> dict:
    """Make relative local paths in a spec relative to the spec file's folder."""
    data = dict(data)

    def anchor(section: str, key: str) -> None:
        body = data.get(section)
        if isinstance(body, dict) and isinstance(body.get(key), str):
            value = body[key]
            if not is_uri(value) and not Path(value).expanduser().is_absolute():
                data[section] = {**body, key: str(base_dir / value)}

    anchor("input", "path")
    anchor("model", "catalog")
    image = data.get("image")
    if image is None or (isinstance(image, dict) and not image.get("base_dir")):
        data["image"] = {**(image or {}), "base_dir": str(base_dir)}  # image paths start from the spec's folder
    else:
        anchor("image", "base_dir")
    qc = data.get("qc")
    if isinstance(qc, dict) and isinstance(qc.get("style_references"), dict):
        refs = {
            k: v if is_uri(str(v)) or Path(str(v)).expanduser().is_absolute() else str(base_dir / str(v))
            for k, v in qc["style_references"].items()
        }
        data["qc"] = {**qc, "style_references": refs}
    signing = (data.get("provenance") or {}).get("signing") if isinstance(data.get("provenance"), dict) else None
    if isinstance(signing, dict):
        anchored = {
            k: str(base_dir / v)
            if k in ("cert", "key") and isinstance(v, str) and not Path(v).expanduser().is_absolute()
            else v
            for k, v in signing.items()
        }
        data["provenance"] = {**data["provenance"], "signing": anchored}
    # output.uri stays relative to where the job runs (like any CLI tool's output flag).
    return data
