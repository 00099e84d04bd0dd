"""The catalog row: one per image, failures included. Declared once, here.

Files live under <output>/catalog/date=YYYY-MM-DD/run_id=<run>/part-*.parquet (hive partitions:
`date` and `run_id` come from the path). Readers: pyarrow datasets, DuckDB
`read_parquet('<output>/catalog/**/*.parquet', hive_partitioning=true)`.
"""

from __future__ import annotations

import pyarrow as pa

from app.accelerator import ACCELERATOR_SETTINGS_TYPE
from app.request import CONDITIONING_TYPE, LORA_TYPE, MODEL_TYPE, STRMAP_TYPE, TEMPLATE_TYPE

STATUSES = ("accepted", "review", "rejected", "failed")

# The request's parts keep their types here (app/request.py declares them once).
TEMPLATE, MODEL, LORA, STRMAP = TEMPLATE_TYPE, MODEL_TYPE, LORA_TYPE, STRMAP_TYPE
VARIANT = pa.struct(
    [
        ("preset", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
    ]
)
STRMAP = pa.map_(pa.string(), pa.string())
# Where the pixels came from, for a remote generator backend (null: imagefab's own diffusers generator).
BACKEND = pa.struct(
    [
        ("name", pa.string()),  # a1111 | stability | openai
        ("endpoint_host", pa.string()),  # host[:port] only
        ("provider_model", pa.string()),  # the provider's model / engine id
        ("request_id", pa.string()),  # the provider's id for the call, when it sends one
        ("seed", pa.int64()),  # the seed the provider says it used (null: it has none)
        ("reproducible", pa.bool_()),  # False: the same request need not give the same bytes
        ("unhonoured", pa.list_(pa.string())),  # request fields the provider could not apply
        ("api_cost_usd", pa.float64()),  # the provider's price for this image
    ]
)
# What an image-conditioned image started from (the request's `Conditioning`: mode, input and mask by
# URI and sha256, the mode's settings), and what the output says about its input (app/conditioning/
# plan.py `Measures`; null where the mode does not measure it). Null for txt2img.
CONDITIONING_MEASURES = (
    ("kept_mean_abs", pa.float64()),  # 0-255: mean |output - input| over kept pixels outside the blend band
    ("kept_max_abs", pa.float64()),  # 0-255
    ("kept_pixels", pa.int64()),  # kept pixels measured (outside the band)
    ("seam", pa.float64()),  # seam score along the mask's border (about 1: no visible edge)
    ("seam_input", pa.float64()),  # the input's own score along the same ring
    ("tile_seam", pa.float64()),  # upscale: steps across tile edges over steps elsewhere
    ("source_difference", pa.float64()),  # upscale: 0-255, the output shrunk back vs the input
    ("generated_sharpness", pa.float64()),  # inpaint/outpaint: QC's sharpness over the generated pixels
)
CONDITIONING = pa.struct([*CONDITIONING_TYPE, *(pa.field(n, t) for n, t in CONDITIONING_MEASURES)])
# The spec's `rights` and the model catalog's licence of each model the image was made with.
USAGE_RIGHTS = pa.struct(
    [
        ("licence", pa.string()),
        ("owner", pa.string()),
        ("notes", pa.string()),
        ("model_licences", pa.list_(pa.struct([("name", pa.string()), ("licence", pa.string())]))),
    ]
)

CATALOG_SCHEMA = pa.schema(
    [
        # identity and outcome
        ("image_id", pa.string()),
        ("source", pa.string()),  # bulk | serve
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),  # accepted | review | rejected | failed
        ("reasons", pa.list_(pa.string())),
        ("error", pa.string()),
        # what was asked
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("template", TEMPLATE),
        ("variables", STRMAP),
        ("tags", STRMAP),
        ("row_key", pa.string()),
        ("variation", pa.int32()),
        ("row_group", pa.string()),  # one row's attempts in one combination (app/quota.py); null before
        # how it was rendered: with image_id, enough to render it again
        ("base_model", MODEL),
        ("loras", pa.list_(LORA)),
        ("scheduler", pa.string()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("seed", pa.int64()),
        ("tier", pa.string()),
        ("combination", pa.string()),  # the spec's named base + LoRA stack + settings
        ("lora_fused", pa.bool_()),  # the stack was merged into the weights (decides the last bits)
        ("batch_id", pa.string()),  # the pipeline call it was rendered in (== image_id when alone)
        ("batch_size", pa.int32()),
        ("pixel_sha256", pa.string()),  # sha256 of the raw RGB bytes, checked by `regenerate`
        ("backend", BACKEND),  # null for the diffusers generator; older catalogs read it as null
        ("conditioning", CONDITIONING),  # null for txt2img; older catalogs read it as null
        # quality control
        ("sharpness", pa.float64()),
        ("contrast", pa.float64()),
        ("exposure", pa.float64()),
        ("clip_score", pa.float64()),
        ("phash", pa.string()),
        ("nearest_duplicate", pa.string()),
        ("style_distance", pa.float64()),
        ("qc_scores", pa.map_(pa.string(), pa.float64())),  # every QC measure (artefacts, …) by name
        ("qc_version", pa.string()),
        # outputs
        ("uri", pa.string()),
        ("bytes", pa.int64()),  # size of the master file at `uri`
        ("variants", pa.list_(VARIANT)),
        # cost
        ("gpu_seconds", pa.float64()),
        ("cpu_seconds", pa.float64()),
        ("cost_usd", pa.float64()),
        ("accelerator", pa.string()),  # the device and its settings in words (and for price tables)
        ("accelerator_settings", ACCELERATOR_SETTINGS_TYPE),  # the same as values: what `regenerate` applies
        # governance
        ("usage_rights", pa.string()),  # in words: licence, owner, notes, the models' licences
        ("rights", USAGE_RIGHTS),  # the same as values; null for failed rows and older catalogs
        ("approval", pa.string()),  # pending; people's decisions are appended elsewhere and joined
    ]
)
PARTITIONS = ("date", "run_id")
COLUMNS = tuple(CATALOG_SCHEMA.names)


def empty_row() -> dict:
    """A row with every column present: nulls, empty lists/maps, for writers to fill in."""
    row: dict[str, object] = {name: None for name in COLUMNS}
    row.update(reasons=[], loras=[], variants=[], variables=[], tags=[], qc_scores=[], error="", approval="pending")
    return row


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts keyed by column) -> a table in the catalog schema; maps may be given as dicts."""
    fixed = []
    for r in rows:
        r = {**empty_row(), **r}
        for m in ("variables", "tags", "qc_scores"):
            if isinstance(r[m], dict):
                r[m] = list(r[m].items())
        fixed.append(r)
    return pa.Table.from_pylist(fixed, schema=CATALOG_SCHEMA)


class CatalogSchemaError(ValueError):
    """A catalog file holds a column whose type cannot become the declared one; the message names it."""


def conform(table: pa.Table, where: str = "") -> pa.Table:
    """A table read from any catalog file, in today's schema: every declared column, in the
    declared order and type (a column a file predates becomes nulls, a widened type is cast);
    columns a newer writer added and this one does not know stay, after the declared ones.
    A struct column where text is declared (or the reverse) is carried across as JSON text /
    parsed JSON, so files of both forms can live in one compacted file."""
    import json

    out, fields = [], []
    for field in CATALOG_SCHEMA:
        if field.name not in table.column_names:
            col = pa.nulls(table.num_rows, field.type)
        else:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                if pa.types.is_string(field.type) and pa.types.is_struct(col.type):
                    col = pa.array(
                        [None if v is None else json.dumps(v, sort_keys=True) for v in col.to_pylist()], pa.string()
                    )
                elif pa.types.is_struct(field.type) and pa.types.is_string(col.type):
                    col = pa.array([_json_object(v, field.type) for v in col.to_pylist()], field.type)
                else:
                    try:
                        col = col.cast(field.type)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                        raise CatalogSchemaError(
                            f"{where or 'catalog file'}: column {field.name!r} is {col.type}, "
                            f"the catalog declares {field.type} ({e})"
                        ) from e
        out.append(col)
        fields.append(field)
    for name in table.column_names:
        if name not in COLUMNS:
            out.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(out, schema=pa.schema(fields))


def _json_object(text: str | None, struct: pa.StructType) -> dict | None:
    """A struct value from a text column: JSON of an object, else the text in the struct's first
    text field (`usage_rights: "internal"` -> {licence: "internal"}), so no text is lost."""
    import json

    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    first = next((f.name for f in struct if pa.types.is_string(f.type)), None)
    return {first: text} if first else None
