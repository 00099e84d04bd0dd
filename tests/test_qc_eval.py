"""The precision / recall table of `benchmarks/qc_eval.py` at 512 px holds (a regression guard)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parents[1] / "benchmarks" / "qc_eval.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("qc_eval", EVAL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["qc_eval"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.measure((512,)), module


def test_every_clean_image_is_accepted(report) -> None:
    result, _ = report
    for group in ("photo", "packshot", "scene"):
        assert result.originals[f"{group}:review"] == [], group
        assert result.originals[f"{group}:rejected"] == [], group
        assert len(result.originals[f"{group}:accepted"]) >= 8, group


@pytest.mark.parametrize(
    ("check", "min_precision", "min_recall"),
    [
        ("blur", 1.0, 1.0),
        ("low_contrast", 1.0, 1.0),
        ("overexposed", 1.0, 0.6),  # night scenes (rocket, hubble) clip little even at 2.5x
        ("color_cast", 0.95, 0.9),
        ("black_block", 1.0, 1.0),
        ("green_block", 1.0, 1.0),
        ("blockiness", 1.0, 1.0),
        ("banding", 1.0, 0.85),  # a dark photo posterised keeps too few tones in its smooth areas
        ("duplicate", 1.0, 1.0),
        ("any defect", 1.0, 0.95),
    ],
)
def test_precision_of_rejects_and_recall_of_flags(report, check: str, min_precision: float, min_recall: float) -> None:
    result, _ = report
    tally = result.tallies[check]
    assert tally.positives > 0 and tally.negatives > 0
    assert tally.precision_rejected >= min_precision, tally
    assert tally.recall_flagged >= min_recall, tally


def test_the_table_prints(report) -> None:
    result, module = report
    text = module.format_report(result, details=True)
    assert "| color_cast" in text and "| duplicate" in text and "Hard cases" in text
