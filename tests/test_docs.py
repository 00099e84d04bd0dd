"""docs/SPEC.md and docs/CATALOG.md name every field, preset and column the code defines, and the
project's text describes the product, not the history of its making."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from app.catalog.schema import CATALOG_SCHEMA
from app.postprocess import PRESETS
from app.qc import KNOWN_CHECKS
from app.schedulers import SCHEDULERS
from app.spec import SIZE_PRESETS, JobSpec, parse_spec

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field of a spec model, nested models included (`postprocess.watermark.text`)."""
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and path != "size":
                paths += field_paths(candidate, f"{path}[]." if path == "model.loras" else f"{path}.")
    return paths


def test_spec_reference_names_every_field():
    text = (DOCS / "SPEC.md").read_text()
    paths = field_paths(JobSpec)
    missing = [p for p in paths if f"`{p}`" not in text]
    assert not missing, f"docs/SPEC.md does not document {missing}"


def test_spec_reference_lists_every_preset_scheduler_and_check():
    text = (DOCS / "SPEC.md").read_text()
    names = [*SIZE_PRESETS, *PRESETS, *SCHEDULERS, *KNOWN_CHECKS]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"docs/SPEC.md does not list {missing}"


def test_spec_reference_example_is_a_valid_spec():
    text = (DOCS / "SPEC.md").read_text()
    example = text.split("## A complete annotated example", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", example, re.S).group(1)
    spec = parse_spec(yaml.safe_load(block), where="docs/SPEC.md example")
    # "Every field": the example sets each top-level field explicitly.
    assert set(yaml.safe_load(block)) == set(JobSpec.model_fields)
    assert spec.postprocess.watermark is not None


def test_catalog_reference_names_every_column():
    text = (DOCS / "CATALOG.md").read_text()
    missing = [c for c in CATALOG_SCHEMA.names if f"`{c}`" not in text]
    assert not missing, f"docs/CATALOG.md does not document {missing}"


# --- the text speaks of the product ---------------------------------------------------------------

# What the work on imagefab left in its text that says nothing about imagefab: ticket numbers,
# work rounds and sessions, the brief, lent machines, a job runner's output folder. Another
# project's issue is cited as `owner/repo#N` or by URL, which these rules leave alone, and so are
# CSS colours (`#999;`) and character references (`&#13;`).
BUILD_HISTORY = {
    "an issue or ticket number": r"\b(?:issue|ticket)s?\s*#?\d+",
    "a ticket reference": r"(?:^|[\s(\[])#\d+(?=[\s).,:\]]|$)",
    "a work round": r"\bwork rounds?\b|\bround \d+\b",
    "a numbered session": r"\bsessions? \d+\b",
    "the brief": r"\b(?:the|project) brief\b|\bbrief's\b",
    "a lent machine": r"\blent\b",
    "a job runner's output folder": r"\$OUT\b",
}
# Code and tests use temporary folders; the docs show commands a reader can run anywhere.
DOCS_ONLY = {"a temporary path": r"/tmp/"}
TEXT_FILES = ("*.md", "*.py", "*.yaml", "*.yml", "*.toml", "Makefile")


def build_history(name: str, text: str) -> list[str]:
    """`line: what` for each line of a file's text that speaks of how the project was built."""
    rules = {**BUILD_HISTORY, **(DOCS_ONLY if name.endswith(".md") else {})}
    return [
        f"{number}: {what}: {line.strip()[:120]}"
        for number, line in enumerate(text.splitlines(), 1)
        for what, pattern in rules.items()
        if re.search(pattern, line, re.IGNORECASE)
    ]


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", *TEXT_FILES, "**/Makefile"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in listed.split("\0") if name]


def test_tracked_text_describes_the_product_not_its_making():
    files = [f for f in tracked_text_files() if f != Path(__file__).resolve()]  # this file holds the rules
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files), files[:5]
    found = {
        str(f.relative_to(REPO)): hits
        for f in files
        if f.is_file() and (hits := build_history(f.name, f.read_text(encoding="utf-8")))
    }
    assert not found, "\n".join(f"{name}:{hit}" for name, hits in found.items() for hit in hits)


@pytest.mark.parametrize(
    ("name", "line", "what"),
    [
        ("RESULTS.md", "## GPU generator speed (issue 10)", "an issue or ticket number"),
        ("gen.py", "# the figure that Issue #10 quotes", "an issue or ticket number"),
        ("CHANGES.md", "- fixed the batch padding (#12)", "a ticket reference"),
        ("test_x.py", "    # measured in work round 3", "a work round"),
        ("GPU-NOTES.md", "default on; session 4)", "a numbered session"),
        ("scaling.py", "# Quoted in the brief: H200, stock diffusers", "the brief"),
        ("RESULTS.md", "The first device lent to this work: one H100", "a lent machine"),
        ("RESULTS.md", "  --gemms --json $OUT/gpu.json", "a job runner's output folder"),
        ("CATALOG.md", "imagefab run specs/ecommerce.yaml --output /tmp/helper3-out", "a temporary path"),
    ],
)
def test_build_history_is_found(name, line, what):
    hits = build_history(name, f"fine text\n{line}\n")
    assert hits and all(hit.startswith("2: ") for hit in hits) and what in [hit.split(": ")[1] for hit in hits]


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("fp8.py", "# without it (pytorch/pytorch#147971; torchao routes such matmuls elsewhere)"),
        ("README.md", "see https://github.com/huggingface/diffusers/issues/1234 for the upstream bug"),
        ("report.py", ".meta{color:#666} button{border:1px solid #999;cursor:pointer}"),
        ("postprocess.py", 'return text.replace("\\r", "&#13;")'),
        ("conftest.py", '@pytest.fixture(scope="session")'),
        ("SPEC.md", "float32 sum, one rounding; rounds to the nearest multiple of 8"),
        ("test_spec.py", 'load_spec(path, {"output.uri": "/tmp/x"})'),
        ("report.py", "a single HTML file, to be attached to a ticket and opened offline"),
    ],
)
def test_product_text_is_not_taken_for_build_history(name, line):
    assert build_history(name, line) == []
