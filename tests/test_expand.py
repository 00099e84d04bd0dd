"""Expansion of input rows into render requests, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from app.expand import ExpandRows, ResolvedModels, RowError, parse_lora_list
from app.plan import check_input, split_plan
from app.request import RenderRequest
from app.spec import SpecError, parse_spec


@pytest.fixture
def models(tiny_base, tiny_loras, model_catalog):
    return ResolvedModels.single(tiny_base, loras=dict(tiny_loras), known_loras=tuple(model_catalog.names("lora")))


def make_spec(**over):
    data = {
        "run_name": "t",
        "input": {"path": "/x.csv", "prompt_template": "photo of {name}, {color}", "key_column": "pid"},
        "tags": ["pid"],
        "static_tags": {"campaign": "c1"},
        "variations": {"seeds_per_row": 2},
        "model": {"loras": [{"name": "tiny-style", "weight": 0.8}]},
        "size": "tiny-square",
        "steps": 4,
    }
    data.update(over)
    return parse_spec(data)


def expand(spec, models, rows):
    return ExpandRows(spec, models)(pa.Table.from_pylist(rows)).to_pydict()


def test_template_rows_become_requests_with_tags_and_lineage(models):
    out = expand(make_spec(), models, [{"pid": "P1", "name": "boot", "color": "tan"}])
    assert out["status"] == ["pending", "pending"]
    req = RenderRequest.from_arrow_value(out["request"][0])
    assert req.prompt == "photo of boot, tan"
    assert req.variables == {"name": "boot", "color": "tan"}
    assert req.tags == {"campaign": "c1", "pid": "P1"}
    assert req.row_key == "P1"
    assert req.template["name"] == "inline" and len(req.template["version"]) == 12
    assert req.base_model["sha256"] == models.bases["tiny-sdxl"].sha256
    assert [(lo.name, lo.weight, lo.sha256) for lo in req.loras] == [
        ("tiny-style", 0.8, models.loras["tiny-style"].sha256)
    ]
    assert (req.width, req.height, req.steps) == (256, 256, 4)
    # Two variations: two different seeds, two different ids.
    r2 = RenderRequest.from_arrow_value(out["request"][1])
    assert r2.seed != req.seed and out["image_id"][0] != out["image_id"][1]


def test_image_id_is_the_hash_of_what_decides_the_pixels(models):
    spec = make_spec()
    rows = [{"pid": "P1", "name": "boot", "color": "tan"}]
    a = expand(spec, models, rows)
    # Same request again, from another batch: same ids and seeds.
    assert expand(spec, models, rows)["image_id"] == a["image_id"]
    req = RenderRequest.from_arrow_value(a["request"][0])
    assert req.image_id == req.pixel_id()
    # Tags do not decide pixels; the LoRA weight, steps and prompt do.
    assert expand(make_spec(static_tags={"campaign": "other"}), models, rows)["image_id"] == a["image_id"]
    assert expand(make_spec(steps=5), models, rows)["image_id"] != a["image_id"]
    assert (
        expand(make_spec(model={"loras": [{"name": "tiny-style", "weight": 0.5}]}), models, rows)["image_id"]
        != a["image_id"]
    )


def test_derived_seeds_do_not_depend_on_other_rows(models):
    spec = make_spec()
    one = expand(spec, models, [{"pid": "P2", "name": "mug", "color": "white"}])
    two = expand(
        spec, models, [{"pid": "P1", "name": "boot", "color": "tan"}, {"pid": "P2", "name": "mug", "color": "white"}]
    )
    assert one["image_id"] == two["image_id"][2:]


def test_fixed_seeds_and_row_seed_column(models):
    spec = make_spec(variations={"seeds_per_row": 3, "seed_mode": "fixed", "seeds": [7, 8, 9]})
    out = expand(spec, models, [{"pid": "P1", "name": "a", "color": "b"}])
    assert [RenderRequest.from_arrow_value(r).seed for r in out["request"]] == [7, 8, 9]
    out = expand(spec, models, [{"pid": "P1", "name": "a", "color": "b", "seed": "100"}])
    assert [RenderRequest.from_arrow_value(r).seed for r in out["request"]] == [100, 101, 102]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"name": "", "color": "tan"}, "template column 'name' is empty"),
        ({"name": None, "color": "tan"}, "template column 'name' is empty"),
        ({"name": "boot", "color": "tan", "width": "1001"}, "divisible by 8 but are 1001 and 256"),
        ({"name": "boot", "color": "tan", "width": "100000"}, "outside 64..4096"),
        ({"name": "boot", "color": "tan", "height": "wide"}, "height 'wide' is not a number"),
        ({"name": "boot", "color": "tan", "loras": "tiny-nope:0.5"}, "unknown LoRA 'tiny-nope' (known: "),
        ({"name": "boot", "color": "tan", "loras": "tiny-style:9"}, "outside -4..4"),
        ({"name": "boot", "color": "tan", "loras": "tiny-style:abc"}, "is not a number"),
        ({"name": "boot", "color": "tan", "seed": "1.5"}, "not a whole number"),
    ],
)
def test_bad_rows_fail_with_a_reason_and_others_go_on(models, row, reason):
    good = {"pid": "ok", "name": "mug", "color": "white"}
    out = expand(make_spec(), models, [{"pid": "bad", **row}, good])
    assert out["status"] == ["failed", "failed", "pending", "pending"]
    assert out["error"][0].startswith("bad_row: ") and reason in out["error"][0], out["error"][0]
    partial = RenderRequest.from_arrow_value(out["request"][0])
    assert partial.tags["pid"] == "bad" and partial.row_key == "bad" and partial.image_id == out["image_id"][0]
    if row["name"] is None or row["name"] == "":
        assert partial.prompt == "photo of {name}, tan"  # the failed row still says what it was
    else:
        assert partial.prompt == f"photo of {row['name']}, tan"
    assert out["image_id"][0] != out["image_id"][1]  # each variation has its own failed row


def test_prompt_column_and_empty_prompt(models):
    spec = parse_spec(
        {"run_name": "t", "input": {"path": "/x.parquet"}, "size": "tiny-square", "negative_prompt": "blurry"}
    )
    out = expand(
        spec,
        models,
        [
            {"prompt": "  a   red  shoe ", "negative_prompt": None},
            {"prompt": "   "},
            {"prompt": None},
            {"prompt": "cat", "negative_prompt": "dog"},
        ],
    )
    assert out["status"] == ["pending", "failed", "failed", "pending"]
    assert RenderRequest.from_arrow_value(out["request"][0]).prompt == "a red shoe"
    assert RenderRequest.from_arrow_value(out["request"][0]).negative_prompt == "blurry"
    assert RenderRequest.from_arrow_value(out["request"][3]).negative_prompt == "dog"
    assert "empty prompt" in out["error"][1]


def test_row_lora_column_replaces_the_spec_stack(models):
    out = expand(make_spec(), models, [{"pid": "x", "name": "a", "color": "b", "loras": "tiny-detail:0.5, tiny-style"}])
    req = RenderRequest.from_arrow_value(out["request"][0])
    assert [(lo.name, lo.weight) for lo in req.loras] == [("tiny-detail", 0.5), ("tiny-style", 1.0)]
    assert out["combination"][0] == "tiny-sdxl|tiny-detail@0.5,tiny-style@1"


def test_lora_problems_fail_only_their_rows(tiny_base, tiny_loras):
    models = ResolvedModels.single(
        tiny_base,
        loras={"tiny-style": tiny_loras["tiny-style"]},
        known_loras=("tiny-style", "broken"),
        lora_problems={"broken": "/m/broken: sha256 mismatch"},
    )
    out = expand(
        make_spec(),
        models,
        [{"pid": "1", "name": "a", "color": "b", "loras": "broken:1"}, {"pid": "2", "name": "a", "color": "c"}],
    )
    assert out["status"] == ["failed", "failed", "pending", "pending"]
    assert "sha256 mismatch" in out["error"][0]


def test_parse_lora_list():
    assert parse_lora_list("a:0.5; b , c:-1") == [("a", 0.5), ("b", 1.0), ("c", -1.0)]
    with pytest.raises(RowError):
        parse_lora_list("a:nan")


def test_check_input_names_a_missing_template_column():
    spec = make_spec()
    with pytest.raises(
        SpecError, match=r"input.prompt_template: column 'color' is not in /x.csv \(columns: pid, name\)"
    ):
        check_input(spec, ["pid", "name"])
    with pytest.raises(SpecError, match=r"tags\[0\]: column 'pid'"):
        check_input(make_spec(input={"path": "/x.csv", "prompt_template": "{name}"}), ["name"])


def test_split_plan_dedupes_skips_existing_and_sets_failed_aside(models):
    rows = [
        {"pid": "1", "name": "a", "color": "b"},
        {"pid": "1", "name": "a", "color": "b"},
        {"pid": "2", "name": "", "color": "b"},
        {"pid": "3", "name": "c", "color": "d"},
    ]
    out = expand(make_spec(variations={"seeds_per_row": 1}), models, rows)
    table = pa.table(out)
    plan = split_plan(table, done_ids={out["image_id"][3]})
    assert plan.total == 4 and plan.duplicates == 1 and plan.skipped == 1
    assert plan.failed.num_rows == 1 and plan.pending.num_rows == 1
    assert plan.pending.column("image_id").to_pylist() == [out["image_id"][0]]


MATRIX_INPUT = {
    "path": "/x.csv",
    "prompt_template": "photo of {name}, {color}, {scene}, {light}",
    "key_column": "pid",
    "matrix": {"scene": ["on a kitchen counter", "on a beach towel"], "light": ["morning", "dusk", "neon"]},
}


def test_matrix_expands_each_row_once_per_combination_with_its_own_prompt_and_seeds(models):
    spec = make_spec(input=MATRIX_INPUT)
    out = expand(
        spec, models, [{"pid": "P1", "name": "boot", "color": "tan"}, {"pid": "P2", "name": "mug", "color": "red"}]
    )

    reqs = [RenderRequest.from_arrow_value(r) for r in out["request"]]
    assert out["status"] == ["pending"] * 2 * 6 * 2  # rows x (2 scenes x 3 lights) x seeds_per_row
    first = reqs[:12]
    assert [(r.variables["scene"], r.variables["light"], r.variation) for r in first[:4]] == [
        ("on a kitchen counter", "morning", 0),
        ("on a kitchen counter", "morning", 1),
        ("on a kitchen counter", "dusk", 0),
        ("on a kitchen counter", "dusk", 1),
    ]
    assert first[0].prompt == "photo of boot, tan, on a kitchen counter, morning"
    assert first[0].tags == {"campaign": "c1", "pid": "P1", "scene": "on a kitchen counter", "light": "morning"}
    assert {r.row_key for r in first} == {"P1"}
    # Derived seeds follow the prompt: every combination and variation has its own seed and id.
    assert len({r.seed for r in reqs}) == len(reqs) and len(set(out["image_id"])) == len(reqs)
    # A row's requests do not depend on the other rows, nor on the batch they came in.
    alone = expand(spec, models, [{"pid": "P2", "name": "mug", "color": "red"}])
    assert alone["image_id"] == out["image_id"][12:]


def test_a_bad_row_fails_once_per_matrix_combination(models):
    spec = make_spec(input=MATRIX_INPUT, variations={"seeds_per_row": 1})
    out = expand(spec, models, [{"pid": "bad", "name": "", "color": "tan"}])

    assert out["status"] == ["failed"] * 6 and len(set(out["image_id"])) == 6
    partial = RenderRequest.from_arrow_value(out["request"][5])
    assert partial.tags["scene"] == "on a beach towel" and partial.tags["light"] == "neon"
    assert partial.prompt == "photo of {name}, tan, on a beach towel, neon"


def test_check_input_refuses_a_matrix_name_that_is_also_a_column():
    spec = make_spec(input=MATRIX_INPUT, tags=["pid", "scene"])
    check_input(spec, ["pid", "name", "color"])  # matrix names count as columns for the template and tags
    with pytest.raises(SpecError, match=r"input.matrix.scene: /x.csv has a column 'scene' too; rename"):
        check_input(spec, ["pid", "name", "color", "scene"])


def test_a_quota_counts_each_matrix_combination_of_a_row_apart(models):
    quota = {"accepted_per_row": 1, "max_attempts_per_row": 2}
    spec = make_spec(input=MATRIX_INPUT, variations=quota)
    out = expand(spec, models, [{"pid": "P1", "name": "boot", "color": "tan"}])

    reqs = [RenderRequest.from_arrow_value(r) for r in out["request"]]
    assert len(reqs) == 6 * 2  # every attempt of every combination is expanded up front
    groups: dict[str, set] = {}
    for r in reqs:
        groups.setdefault(r.row_group, set()).add((r.variables["scene"], r.variables["light"]))
    assert len(groups) == 6 and all(len(cells) == 1 for cells in groups.values())
