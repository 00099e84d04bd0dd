"""docs/SPEC.md and docs/CATALOG.md name every field, preset and column the code defines."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from app.catalog.schema import CATALOG_SCHEMA
from app.postprocess import PRESETS
from app.qc import KNOWN_CHECKS
from app.schedulers import SCHEDULERS
from app.spec import SIZE_PRESETS, JobSpec, parse_spec

DOCS = Path(__file__).resolve().parents[1] / "docs"


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
