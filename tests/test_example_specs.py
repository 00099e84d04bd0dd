"""The example specs under specs/ load, validate and expand as their comments promise.

Runs the driver-side code a job runs before rendering (load, input check, model resolution,
expansion) on the real example inputs and the tiny built-in models; no Ray, nothing rendered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from app.expand import ExpandRows, RowError, parse_lora_list
from app.models.catalog import ModelCatalog
from app.plan import check_input, csv_string_types, input_columns, resolve_models
from app.request import RenderRequest
from app.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").glob("*.yaml"))

# Requests each example expands to: input rows x matrix x seeds_per_row x targets x strengths. Pinned, so an edit to an example's
# data or variations shows up here; a new example needs its line.
EXPECTED_REQUESTS = {
    "ecommerce.yaml": 12,  # 6 products x 2 seeds
    "ecommerce_packshots.yaml": 36,  # 4 packshots x 3 scenes x 3 outpainting targets
    "game_sketches.yaml": 8,  # 4 sketches x 2 strengths
    "game_assets.yaml": 60,  # 1 prompt x 3 styles x 20 seeds
    "social.yaml": 4,  # 4 campaign messages x 1 seed
}


def read_rows(spec: JobSpec, columns: list[str]) -> pa.Table:
    """The input as the job reads it (CSV cells as text), honouring `input.limit`."""
    if spec.input.resolved_format == "csv":
        table = pacsv.read_csv(spec.input.path, convert_options=csv_string_types(columns))
    else:
        table = pq.read_table(spec.input.path)
    return table.slice(0, spec.input.limit) if spec.input.limit else table


def row_lora_names(table: pa.Table) -> set[str]:
    """LoRA names the rows' `loras` column asks for, as `jobs/generate.py` collects them."""
    if "loras" not in table.column_names:
        return set()
    names: set[str] = set()
    for value in table.column("loras").unique().to_pylist():
        try:
            names.update(name for name, _ in parse_lora_list(str(value or "")))
        except RowError:
            pass  # that row fails during expansion, which the test reports
    return names


def expand(spec: JobSpec) -> list[dict]:
    columns = input_columns(spec)
    check_input(spec, columns)
    table = read_rows(spec, columns)
    models = resolve_models(spec, ModelCatalog.load(spec.model.catalog), row_lora_names(table))
    out = ExpandRows(spec, models)(table).to_pydict()
    return [dict(zip(out, values)) for values in zip(*out.values())]


def requests_of(spec: JobSpec) -> list[RenderRequest]:
    rows = expand(spec)
    failed = sorted({r["error"] for r in rows if r["status"] != "pending"})
    assert not failed, f"{spec.run_name}: rows failed to expand: {failed}"
    return [RenderRequest.from_arrow_value(r["request"]) for r in rows]


def test_every_example_has_an_expected_count():
    assert SPECS, "no specs/*.yaml found"
    missing = sorted({p.name for p in SPECS} - set(EXPECTED_REQUESTS))
    assert not missing, f"add the expected request count of {missing} to EXPECTED_REQUESTS"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_expands_without_failed_rows(path: Path):
    spec = load_spec(path)
    assert Path(spec.input.path).is_file(), f"{path.name}: input {spec.input.path} does not exist"

    rows = expand(spec)

    failed = sorted({r["error"] for r in rows if r["status"] != "pending"})
    assert not failed, f"{path.name}: rows failed to expand: {failed}"
    assert len(rows) == EXPECTED_REQUESTS[path.name]
    ids = [r["image_id"] for r in rows]
    assert len(set(ids)) == len(ids), f"{path.name}: image ids repeat"
    for r in rows:
        req = RenderRequest.from_arrow_value(r["request"])
        if req.mode != "outpaint":  # an outpainting canvas has its target's ratio
            assert (req.width, req.height) == (spec.size.width, spec.size.height)
        assert set(spec.static_tags.items()) <= set(req.tags.items())
        assert set(spec.tags) <= set(req.tags), f"{path.name}: a tag column is missing from {req.tags}"


def test_game_assets_share_twenty_seeds_across_three_styles():
    spec = load_spec(REPO / "specs" / "game_assets.yaml")
    requests = requests_of(spec)

    seeds_by_style: dict[str, list[int]] = defaultdict(list)
    for req in requests:
        seeds_by_style[req.combination].append(req.seed)
    assert set(seeds_by_style) == {"painted", "detailed", "alt-base"}
    seed_lists = list(seeds_by_style.values())
    assert seed_lists[0] == list(range(1000, 1020))
    assert all(seeds == seed_lists[0] for seeds in seed_lists), "styles must use the same seeds, in order"
    # One prompt through two base models and three LoRA stacks, each A/B group spanning all three.
    assert {req.prompt for req in requests} == {"isometric fantasy sword game asset, centered, clean background"}
    assert {req.combination_key for req in requests} == {
        "tiny-sdxl|tiny-style@0.8",
        "tiny-sdxl|tiny-detail@0.7,tiny-style@0.3|fused",
        "tiny-sdxl-b|tiny-style-b@0.9",
    }
    groups: dict[str, set] = defaultdict(set)
    for req in requests:
        groups[req.tags["ab_group"]].add((req.combination, req.seed))
    assert len(groups) == 20 and all(
        len({c for c, _ in g}) == 3 and len({s for _, s in g}) == 1 for g in groups.values()
    )


def test_social_renders_every_platform_preset_as_watermarked_jpeg():
    spec = load_spec(REPO / "specs" / "social.yaml")
    post = spec.postprocess

    assert post.presets == ("instagram_square", "instagram_portrait", "tiktok", "linkedin")
    assert post.format == "jpeg" and post.watermark is not None
    prompts = [req.prompt for req in requests_of(spec)]
    assert all("{" not in p for p in prompts), prompts  # every template placeholder was filled


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_cli_validate_accepts_example(path: Path):
    # The installed command, from another working directory: input paths are spec-relative.
    imagefab = Path(sys.executable).with_name("imagefab")
    command = [str(imagefab)] if imagefab.exists() else [sys.executable, "-m", "app.cli"]
    result = subprocess.run(
        [*command, "validate", str(path)],
        cwd=path.parent.parent.parent,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{path}: valid" in result.stdout


def test_packshots_render_every_product_in_three_scenes_at_three_ratios():
    spec = load_spec(REPO / "specs" / "ecommerce_packshots.yaml")
    requests = requests_of(spec)

    scenes = spec.input.matrix["scene"]
    assert len(scenes) == 3 and spec.image.targets == ("9:16", "4:5", "1.91:1")
    cells = {(r.tags["sku"], r.tags["scene"], r.conditioning.target) for r in requests if r.conditioning}
    assert len(cells) == 36  # every sku x scene x target once
    assert {r.mode for r in requests} == {"outpaint"}
    for r in requests:
        assert r.tags["scene"] in r.prompt and r.tags["campaign"] == "summer-scenes"
        w, h = (float(x) for x in r.conditioning.target.split(":"))
        assert abs(r.width / r.height - w / h) < 0.2, (r.width, r.height, r.conditioning.target)
        # The canvas holds the packshot at its own resolution.
        assert r.width >= r.conditioning.source_width and r.height >= r.conditioning.source_height
    # The transparent background is generated too; the coffee cup's own mask says what to keep.
    sources = {r.tags["sku"]: r.conditioning.mask_source for r in requests}
    assert sources == {
        "SKU-2001": "canvas+mask",
        "SKU-2002": "canvas+alpha",
        "SKU-2003": "canvas+alpha",
        "SKU-2004": "canvas+alpha",
    }
    # Seeds follow the prompt: each scene has its own, the three ratios of a scene share it.
    seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
    for r in requests:
        seeds[(r.tags["sku"], r.tags["scene"])].add(r.seed)
    assert all(len(s) == 1 for s in seeds.values()) and len({s.pop() for s in seeds.values()}) == 12


def test_game_sketches_render_each_sketch_at_two_strengths_from_one_seed():
    spec = load_spec(REPO / "specs" / "game_sketches.yaml")
    requests = requests_of(spec)

    by_asset: dict[str, list] = defaultdict(list)
    for r in requests:
        by_asset[r.tags["asset"]].append(r)
    assert set(by_asset) == {"astronaut", "cat", "coffee_cup", "horse"}
    for asset, reqs in by_asset.items():
        assert sorted(r.conditioning.strength for r in reqs) == [0.55, 0.8]
        assert {r.mode for r in reqs} == {"img2img"} and len({r.seed for r in reqs}) == 1
        assert reqs[0].conditioning.image_uri.endswith(f"data/sketches/{asset}.png")
        assert (reqs[0].conditioning.source_width, reqs[0].conditioning.source_height) == (512, 512)
