"""Spec validation: bad specs fail before Ray starts, naming the field path and the value."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from app.spec import JobSpec, Size, SpecError, load_spec, parse_spec


def write(tmp_path, text: str, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


MINIMAL = """
run_name: t
input: {path: rows.parquet}
"""


def test_minimal_spec_gets_defaults_and_anchors_input_to_spec_folder(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.input.path == str(tmp_path / "rows.parquet")
    assert spec.model.base == "tiny-sdxl"
    assert (spec.size.width, spec.size.height) == (1024, 1024)
    assert spec.steps == 30 and spec.guidance == 5.0 and spec.scheduler == "euler"
    assert spec.compute.batch_invariant is True


@pytest.mark.parametrize(
    "patch, field_path, fragment",
    [
        (
            {"model": {"loras": [{"name": "a", "weight": 1}, {"name": "b", "weight": 7.0}]}},
            "model.loras[1].weight",
            "7.0",
        ),
        ({"size": "1001x512"}, "size", "divisible by 8 but are 1001 and 512"),
        ({"size": "huge"}, "size", "'huge' is neither WIDTHxHEIGHT nor a size preset"),
        ({"size": {"width": 64000, "height": 512}}, "size", "outside 64..4096"),
        ({"steps": 0}, "steps", "(got 0)"),
        ({"scheduler": "warp"}, "scheduler", "'warp'"),
        ({"run_name": "no spaces please"}, "run_name", "not a valid run name"),
        ({"variations": {"seeds_per_row": 2, "seed_mode": "fixed", "seeds": [1, 2, 3]}}, "variations", "lists 3 seeds"),
        ({"postprocess": {"presets": ["myspace_banner"]}}, "postprocess.presets", "myspace_banner"),
        ({"qc": {"min_sharpness": 50, "review_sharpness": 10}}, "qc", "review_sharpness"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"input": {"path": "x.csv", "prompt_template": "photo of {name"}}, "input.prompt_template", "malformed"),
        (
            {"input": {"path": "x.csv", "prompt_template": "photo of {name:>10}"}},
            "input.prompt_template",
            "format spec",
        ),
    ],
)
def test_bad_field_is_named_with_its_value(patch, field_path, fragment):
    data = {"run_name": "t", "input": {"path": "rows.parquet"}, **patch}
    with pytest.raises(SpecError) as e:
        parse_spec(data, where="s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml: invalid spec")
    assert f"  {field_path}:" in msg, msg
    assert fragment in msg, msg


def test_missing_required_fields_are_all_listed():
    with pytest.raises(SpecError) as e:
        parse_spec({"steps": 4})
    msg = str(e.value)
    assert "run_name: Field required" in msg and "input: Field required" in msg


def test_yaml_errors_and_missing_files_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(write(tmp_path, "run_name: [unclosed\n"))
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="a spec is a YAML mapping"):
        load_spec(write(tmp_path, "- just\n- a list\n"))


def test_size_forms():
    assert Size.parse("sdxl-portrait") == Size(width=896, height=1152)
    assert Size.parse("768x512") == Size(width=768, height=512)
    assert Size.parse({"width": 512, "height": 256}) == Size(width=512, height=256)


def test_overrides_are_validated_like_the_file(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL), {"steps": 8, "output.uri": "/tmp/x"})
    assert spec.steps == 8 and spec.output.uri == "/tmp/x"
    with pytest.raises(SpecError, match="steps"):
        spec.with_overrides(steps=-1)


def test_spec_is_frozen_and_picklable():
    import pickle

    spec = parse_spec({"run_name": "t", "input": {"path": "/x.parquet"}})
    with pytest.raises(ValidationError, match="frozen"):
        spec.steps = 3  # type: ignore[misc]
    assert spec.steps == 30
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert isinstance(spec, JobSpec)


def test_static_tag_numbers_become_text_and_schedulers_match_the_table():
    from typing import get_args

    from app.schedulers import SCHEDULERS

    spec = parse_spec({"run_name": "t", "input": {"path": "/x.parquet"}, "static_tags": {"year": 2026}})
    assert spec.static_tags == {"year": "2026"}
    assert set(get_args(JobSpec.model_fields["scheduler"].annotation)) == set(SCHEDULERS)


def test_tsv_inputs_are_tab_separated(tmp_path):
    from app.plan import check_input, input_columns

    (tmp_path / "p.tsv").write_text("prompt\tcolor\na shoe\tred\n")
    spec = load_spec(write(tmp_path, "run_name: t\ninput: {path: p.tsv}\n"))
    assert spec.input.resolved_format == "csv" and input_columns(spec) == ["prompt", "color"]
    check_input(spec, input_columns(spec))


@pytest.mark.parametrize(
    "matrix, template, fragment",
    [
        ({"scene": []}, "a {scene}", "matrix.scene: an empty list; give one or more values, or drop 'scene'"),
        ({"scene": ["kitchen", " "]}, "a {scene}", "matrix.scene: an empty value"),
        ({"scene": ["kitchen", "kitchen"]}, "a {scene}", "['kitchen'] listed twice"),
        ({"scene": ["kitchen", "beach"]}, "a product", "its 2 values would render the same image"),
        ({"scene": ["kitchen"]}, None, "give `prompt_template` that uses them"),
    ],
)
def test_bad_matrix_is_refused(matrix, template, fragment):
    data = {"run_name": "t", "input": {"path": "x.csv", "prompt_template": template, "matrix": matrix}}
    with pytest.raises(SpecError) as e:
        parse_spec(data, where="s.yaml")
    assert "  input: " in str(e.value) and fragment in str(e.value), str(e.value)


def test_matrix_names_may_not_be_row_settings_and_numbers_become_text():
    for name in ("seed", "strength", "image"):
        with pytest.raises(SpecError, match=f"input.matrix.{name}: '{name}' is a column the expansion reads"):
            parse_spec(
                {
                    "run_name": "t",
                    "input": {"path": "x.csv", "prompt_template": f"a {{{name}}}", "matrix": {name: ["1"]}},
                }
            )
    spec = parse_spec(
        {
            "run_name": "t",
            "input": {"path": "x.csv", "prompt_template": "{n} {c}", "matrix": {"n": [1, 2.5], "c": ["x"]}},
        }
    )
    assert spec.input.matrix == {"n": ("1", "2.5"), "c": ("x",)}
    assert spec.input.matrix_rows == [{"n": "1", "c": "x"}, {"n": "2.5", "c": "x"}]
    assert parse_spec({"run_name": "t", "input": {"path": "x.csv"}}).input.matrix_rows == [{}]


def test_schema_lists_the_matrix():
    schema = JobSpec.model_json_schema()
    matrix = schema["$defs"]["InputSpec"]["properties"]["matrix"]
    assert matrix["type"] == "object" and matrix["additionalProperties"]["type"] == "array"


def test_images_per_row_counts_every_fan_out():
    base = {
        "run_name": "t",
        "input": {"path": "x.csv", "prompt_template": "{p} {scene}", "matrix": {"scene": ["a", "b"]}},
    }
    assert parse_spec({**base, "variations": {"seeds_per_row": 3}}).images_per_row == 6
    outpaint = {"mode": "outpaint", "targets": ["9:16", "4:5", "1.91:1"], "strength": [0.9, 1.0]}
    assert parse_spec({**base, "image": outpaint}).images_per_row == 2 * 3 * 2
    ab = {"combinations": {"a": {}, "b": {}}, "ab_test": {"combinations": ["a", "b"]}}
    assert parse_spec({**base, **ab}).images_per_row == 4
    quota = {"accepted_per_row": 2, "max_attempts_per_row": 5}  # counts what it asks for, not its attempts
    assert parse_spec({**base, "variations": quota}).images_per_row == 4
