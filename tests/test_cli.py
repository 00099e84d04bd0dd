"""The `imagefab` command's own surface: --version, the spec's JSON Schema, --json output, and
`imagefab run` taking every option of `python -m jobs.generate`. No Ray: `run --json` itself is
exercised in tests/test_raycluster.py, whose run starts one anyway."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from analysis_catalog import make_output

from app import cli

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").glob("*.yaml"))


def imagefab(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_version_comes_from_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"imagefab {md.version('imagefab')}"


# --- the spec's JSON Schema ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict:
    result = imagefab("spec", "schema")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_spec_schema_is_a_valid_json_schema_naming_the_top_level_fields(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"run_name", "input", "model", "size", "qc", "postprocess", "output", "compute"} <= set(schema["properties"])
    assert set(schema["required"]) == {"run_name", "input"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_specs_pass_the_schema(schema, path):
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [(list(e.path), e.message) for e in errors]


def test_spec_schema_accepts_what_the_loader_accepts_and_refuses_what_it_refuses(schema):
    validator = jsonschema.Draft202012Validator(schema)
    base = {"run_name": "x", "input": {"path": "rows.csv", "prompt_template": "a {name}"}}
    # The shorthand forms a spec may use: a size preset or "WxH", numbers as static tags, a QC reference.
    for extra in (
        {"size": "sdxl-square"},
        {"size": "768x1344"},
        {"static_tags": {"year": 2026}},
        {"qc": "qc:/x@production"},
    ):
        assert not list(validator.iter_errors({**base, **extra})), extra
    wrong = {**base, "steps": 0, "colour": "red", "size": {"width": 64}}
    found = {(tuple(e.path), e.validator) for e in validator.iter_errors(wrong)}
    assert (("steps",), "minimum") in found and ((), "additionalProperties") in found
    assert any(path == ("size",) for path, _ in found)


# --- --json ----------------------------------------------------------------------------------------


def test_validate_json_reports_the_resolved_spec():
    result = imagefab("validate", "specs/ecommerce.yaml", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["valid"] is True and report["spec"] == "specs/ecommerce.yaml"
    combo = report["combinations"]["default"]
    assert combo["base"]["name"] == "tiny-sdxl" and len(combo["base"]["sha256"]) == 64
    assert [lo["name"] for lo in combo["loras"]] == ["tiny-style"] and combo["loras"][0]["weight"] == 0.8
    assert report["input"]["format"] == "csv" and "product_name" in report["input"]["columns"]
    assert report["render"] == {"mode": "txt2img", "width": 256, "height": 256, "targets": [], "images_per_row": 2}


def test_validate_json_lists_each_failure_with_its_field_path_and_keeps_exit_code_2():
    result = imagefab(
        "validate", "specs/ecommerce.yaml", "--json", "--set", "steps=0", "--set", "model.loras=[{name: x, weight: 9}]"
    )
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["valid"] is False
    fields = {e["field"]: e["message"] for e in report["errors"]}
    assert fields.keys() == {"steps", "model.loras[0].weight"}
    assert "greater than or equal to 1 (got 0)" in fields["steps"]
    # Problems found after the fields parse (the input's columns) name their field too.
    result = imagefab("validate", "specs/ecommerce.yaml", "--json", "--set", "input.prompt_template=a {nope}")
    assert result.returncode == 2
    [error] = json.loads(result.stdout)["errors"]
    assert error["field"] == "input.prompt_template" and "'nope'" in error["message"]


def test_validate_text_output_is_unchanged_and_errors_still_exit_2():
    ok = imagefab("validate", "specs/ecommerce.yaml")
    assert ok.returncode == 0 and "specs/ecommerce.yaml: valid" in ok.stdout and "  combination default" in ok.stdout
    bad = imagefab("validate", "specs/ecommerce.yaml", "--set", "steps=0")
    assert bad.returncode == 2 and bad.stderr.startswith("imagefab: error:") and "steps" in bad.stderr


def test_validate_counts_the_images_a_row_fans_out_to():
    ok = imagefab("validate", "specs/ecommerce_packshots.yaml")  # 3 scenes x 3 outpainting targets
    assert ok.returncode == 0, ok.stderr
    assert (
        "render  outpaint to 9:16, 4:5, 1.91:1 around each input at its own resolution, 9 image(s) per row" in ok.stdout
    )
    report = json.loads(imagefab("validate", "specs/game_sketches.yaml", "--json").stdout)
    assert report["render"] == {"mode": "img2img", "width": 256, "height": 256, "targets": [], "images_per_row": 2}


def test_catalog_json_counts_runs_and_statuses(tmp_path, capsys):
    out = make_output(str(tmp_path / "out"))
    assert cli.main(["catalog", "--output", out.uri, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    counts = {(r["run_id"].split("-")[0] + r["run_id"][-1], r["status"]): r["images"] for r in report["runs"]}
    assert counts[("shopa", "accepted")] == 4 and counts[("shopa", "review")] == 1 and counts[("shopa", "failed")] == 1
    assert counts[("shopb", "failed")] == 1 and counts[("gamec", "accepted")] == 2
    assert report["output"] == out.uri and all(isinstance(r["cost_usd"], float) for r in report["runs"])
    assert cli.main(["catalog", "--output", str(tmp_path / "empty"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["runs"] == []


# --- imagefab run = python -m jobs.generate ---------------------------------------------------------


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}


def test_imagefab_run_takes_every_option_of_the_job_module():
    from jobs import generate
    from jobs.options import add_run_arguments

    job = argparse.ArgumentParser()
    add_run_arguments(job)
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert option_strings(sub.choices["run"]) == option_strings(job)
    assert {"--run-id", "--strict", "--verbose", "--json", "--quiet", "--no-mlflow"} <= option_strings(job)
    args = generate.parse_args(["s.yaml", "--run-id", "r1", "--strict", "--verbose", "--json"])
    same = cli.build_parser().parse_args(["run", "s.yaml", "--run-id", "r1", "--strict", "--verbose", "--json"])
    assert {k: v for k, v in vars(same).items() if k not in ("command", "func")} == vars(args)
