"""The render request as a typed Arrow struct: one declaration, lossless round trips, ids unchanged."""

from __future__ import annotations

import io
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.request import (
    REQUEST_TYPE,
    LoraRef,
    RenderRequest,
    compute_image_id,
    format_lora_tag,
    parse_lora_tags,
    request_at,
    requests_from_batch,
    requests_from_column,
    requests_to_arrow,
    requests_to_numpy,
)


def make_request(**over) -> RenderRequest:
    loras = (LoraRef("tiny-style", "3", 0.8, "a" * 64, "file:///m/style.safetensors"),)
    values = dict(
        image_id="0" * 32,
        prompt="a red shoe, ünïcode",
        negative_prompt="blurry",
        base_model={"name": "tiny-sdxl", "version": "1", "sha256": "b" * 64, "source": "builtin"},
        loras=loras,
        scheduler="euler",
        steps=4,
        guidance=5.5,
        width=256,
        height=192,
        seed=2**62 + 3,
        template={"name": "inline", "version": "abc", "text": "a {color} shoe"},
        variables={"color": "red"},
        tags={"sku": "00123", "campaign": "c1"},
        tier="hero",
        row_key="P1",
        variation=2,
        combination="hero",
        fuse_loras=True,
    )
    values.update(over)
    return RenderRequest(**values)


def test_the_struct_has_exactly_the_dataclass_fields():
    assert REQUEST_TYPE.names == [f.name for f in fields(RenderRequest)]
    assert pa.types.is_map(REQUEST_TYPE.field("tags").type)
    assert REQUEST_TYPE.field("loras").type.value_type.names == [f.name for f in fields(LoraRef)]


def test_requests_round_trip_through_arrow_parquet_and_numpy_batches():
    reqs = [make_request(), make_request(image_id="1" * 32, loras=(), template={}, variables={}, tags={})]
    column = requests_to_arrow(reqs)
    assert column.type == REQUEST_TYPE
    assert requests_from_column(column) == reqs
    # Through a Parquet file, as the plan is written and read.
    buf = io.BytesIO()
    pq.write_table(pa.table({"request": column}), buf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert requests_from_column(table.column("request")) == reqs
    assert request_at(table, 1) == reqs[1]
    # A Ray Data numpy batch: an object array of dicts whose lists and maps are numpy arrays.
    numpy_like = [
        {
            **v,
            "loras": np.asarray(v["loras"], dtype=object),
            "tags": np.asarray([np.asarray(kv, dtype=object) for kv in v["tags"]] or [], dtype=object),
        }
        for v in table.column("request").to_pylist()
    ]
    batch = {"request": np.asarray(numpy_like, dtype=object)}
    assert requests_from_batch(batch, [0, 1]) == reqs
    assert requests_from_batch({"request": requests_to_numpy(reqs)}, [1, 0]) == [reqs[1], reqs[0]]


def test_a_value_missing_newer_fields_takes_their_defaults():
    old = {k: v for k, v in make_request().to_arrow_value().items() if k not in ("tier", "fuse_loras")}
    req = RenderRequest.from_arrow_value(old)
    assert req.tier == "default" and req.fuse_loras is False


def test_image_ids_of_existing_requests_do_not_change():
    # A catalog's resume and `regenerate` look images up by these ids: the hash must stay put.
    req = make_request()
    image_id = compute_image_id(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        base_sha256=req.base_model["sha256"],
        loras=req.loras,
        scheduler=req.scheduler,
        steps=req.steps,
        guidance=req.guidance,
        width=req.width,
        height=req.height,
        seed=req.seed,
        fuse_loras=req.fuse_loras,
    )
    assert image_id == "2be6c43fcd74b38970664f66530c2f18"


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a cat <lora:style:0.8>", "a cat", [("style", "0.8")]),
        ("<lora:a:1> x  <lora:b:-0.5:0.2> y", "x y", [("a", "1"), ("b", "-0.5")]),
        ("no tags here", "no tags here", []),
        ("<lora:bad:many> z", "z", [("bad", "many")]),
    ],
)
def test_the_a1111_lora_tag_syntax(prompt, text, tags):
    assert parse_lora_tags(prompt) == (text, tags)
    assert parse_lora_tags(" ".join(format_lora_tag(n, float(w)) for n, w in tags if w != "many"))[1] == [
        (n, f"{float(w):g}") for n, w in tags if w != "many"
    ]
