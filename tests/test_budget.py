"""The run budget's ledger: admission exact to one batch, learning the first batch's cost, and
the stop that holds once a cap is reached."""

from __future__ import annotations

import pytest

from app.budget import RunBudget, budget_error


def test_a_known_price_admits_exactly_what_fits_and_then_stops():
    ledger = RunBudget(max_cost_usd=1.0)
    assert ledger.admit("a", 4, usd_per_image=0.15) == 4  # 0.60 reserved
    assert ledger.admit("b", 4, usd_per_image=0.15) == 2  # 0.90: a third would cross 1.00
    state = ledger.snapshot()
    assert state["stopped"] and state["refused_images"] == 2 and "cost cap $1" in state["stopped_because"]
    ledger.settle("a", 4, 0.60, 0.0)
    ledger.settle("b", 2, 0.30, 0.0)
    assert ledger.admit("c", 1, usd_per_image=0.15) == 0  # stopped stays stopped, though 0.10 is left
    assert ledger.snapshot()["spent_usd"] == pytest.approx(0.90)
    assert budget_error(ledger.snapshot()).startswith("budget_exhausted: the run stopped on budget (cost cap $1")


def test_without_a_price_the_first_batch_runs_alone_and_its_cost_is_the_estimate():
    ledger = RunBudget(max_device_seconds=10.0)
    assert ledger.wait_or_refuse("first", 2) == 2
    assert ledger.wait_or_refuse("second", 2) is None  # waits: nothing is known yet
    ledger.settle("first", 2, 0.002, 3.0)  # 1.5 device s per image
    assert ledger.wait_or_refuse("second", 4) == 4  # 3 + 6 = 9 ≤ 10
    assert ledger.wait_or_refuse("third", 4) == 0  # 9 + 1.5 > 10
    assert ledger.snapshot()["stopped"]


def test_a_cap_of_zero_starts_nothing_and_bad_caps_are_refused():
    assert RunBudget(max_cost_usd=0.0).admit("a", 3) == 0
    with pytest.raises(ValueError, match="max_cost_usd"):
        RunBudget(max_cost_usd=float("nan"))
