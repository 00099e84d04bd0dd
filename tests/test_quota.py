"""The quota's rounds without Ray: attempts expanded up front with fixed seeds and a shared row
group, each round giving a short row as many new attempts as it lacks accepted images, earlier
runs' images counting, and the monthly budgets of the price table."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest

from app.budget import MonthlyBudgetExceeded, MonthlyBudgets
from app.cost import PriceTable
from app.expand import ExpandRows, ResolvedModels
from app.quota import Outcome, QuotaPlan, apply_decisions
from app.spec import SpecError, parse_spec

ROWS = pa.table({"pid": ["P1", "P2", "P3"], "name": ["boot", "tote", "mug"]})


def spec(**variations):
    return parse_spec(
        {
            "run_name": "quota",
            "input": {"path": "rows.csv", "prompt_template": "photo of a {name}", "key_column": "pid"},
            "variations": {"base_seed": 7, **variations},
            "model": {"base": "tiny-sdxl"},
            "steps": 2,
            "size": "tiny-square",
        }
    )


@pytest.fixture(scope="module")
def models(tiny_base):
    return ResolvedModels.single(tiny_base)


def attempts(models, **variations):
    s = spec(**variations)
    return s, ExpandRows(s, models)(ROWS)


def test_quota_fields_are_checked_where_they_are_given():
    assert spec(accepted_per_row=2).variations.attempts_per_row == 6  # default: 3 x N
    assert spec(accepted_per_row=2, max_attempts_per_row=5).variations.attempts_per_row == 5
    for bad, words in (
        ({"accepted_per_row": 2, "seeds_per_row": 3}, "not both"),
        ({"accepted_per_row": 3, "max_attempts_per_row": 2}, "could never be met"),
        ({"max_attempts_per_row": 4}, "needs `accepted_per_row`"),
        ({"review_counts_as_accepted": True}, "needs `accepted_per_row`"),
        ({"accepted_per_row": 0}, "accepted_per_row"),
    ):
        with pytest.raises(SpecError, match=words):
            spec(**bad)


def test_every_attempt_is_expanded_with_the_seed_its_variation_has(models):
    _, table = attempts(models, accepted_per_row=2, max_attempts_per_row=4)
    reqs = table.column("request").to_pylist()
    assert len(reqs) == 3 * 4 and [r["variation"] for r in reqs[:4]] == [0, 1, 2, 3]
    _, counted = attempts(models, seeds_per_row=4)  # four seeds per row: the same images
    assert table.column("image_id").to_pylist() == counted.column("image_id").to_pylist()
    # One group per row: every pixel-deciding field but the seed.
    groups = {}
    for r in reqs:
        groups.setdefault(r["row_key"], set()).add(r["row_group"])
    assert all(len(g) == 1 for g in groups.values()) and len({g.pop() for g in groups.values()}) == 3
    _, again = attempts(models, accepted_per_row=2, max_attempts_per_row=6)  # more attempts, same first ones
    assert again.column("image_id").to_pylist()[:4] == table.column("image_id").to_pylist()[:4]


def outcome_of(accepted_variations: dict[str, set[int]]):
    """A QC stand-in for the plan's bookkeeping: which attempts of each row are accepted."""

    def judge(req: dict) -> Outcome:
        if req["variation"] in accepted_variations[req["row_key"]]:
            return Outcome("accepted")
        return Outcome("rejected", ("sharpness 12.0 < 30",))

    return judge


def play(plan: QuotaPlan, table: pa.Table, judge, rounds: int = 100) -> list[list[tuple[str, int]]]:
    """Run the plan's rounds, judging each attempt; returns (row_key, variation) per round."""
    by_id = {r["image_id"]: r for r in table.column("request").to_pylist()}
    played = []
    for _ in range(rounds):
        batch = plan.next_round()
        if not batch.num_rows:
            break
        reqs = [by_id[i] for i in batch.column("image_id").to_pylist()]
        played.append([(r["row_key"], r["variation"]) for r in reqs])
        plan.record((r["image_id"], judge(r)) for r in reqs)
    return played


def test_rounds_render_what_each_row_lacks_until_it_is_met_or_out_of_attempts(models):
    s, table = attempts(models, accepted_per_row=2, max_attempts_per_row=4)
    judge = outcome_of({"P1": {0, 1}, "P2": {1, 3}, "P3": set()})
    plan = QuotaPlan(table, s.variations, {}, set())
    played = play(plan, table, judge)
    assert played == [
        [("P1", 0), ("P1", 1), ("P2", 0), ("P2", 1), ("P3", 0), ("P3", 1)],  # the first N of every row
        [("P2", 2), ("P3", 2), ("P3", 3)],  # P2 lacks one, P3 two
        [("P2", 3)],
    ]
    report = plan.report()
    assert (report["met"], report["groups"], report["rounds"], report["attempts"]) == (2, 3, 3, 10)
    (short,) = report["short"]
    assert short["row_key"] == "P3" and short["accepted"] == 0 and short["attempts"] == 4
    assert short["why"] == "out of attempts" and short["reasons"] == {"sharpness 12.0 < 30": 4}


def test_review_counts_only_when_the_spec_says_so(models):
    judge_review = lambda req: Outcome("review", ("sharpness 80.0 < 100 (review)",))
    s, table = attempts(models, accepted_per_row=1, max_attempts_per_row=3)
    plan = QuotaPlan(table, s.variations, {}, set())
    assert len(play(plan, table, judge_review)) == 3 and plan.report()["met"] == 0
    s, table = attempts(models, accepted_per_row=1, max_attempts_per_row=3, review_counts_as_accepted=True)
    plan = QuotaPlan(table, s.variations, {}, set())
    assert len(play(plan, table, judge_review)) == 1 and plan.report()["met"] == 3


def test_a_rerun_after_a_cut_short_run_neither_repeats_nor_loses_an_attempt(models):
    s, table = attempts(models, accepted_per_row=2, max_attempts_per_row=4)
    judge = outcome_of({"P1": {2, 3}, "P2": {0, 2}, "P3": {1}})
    whole = QuotaPlan(table, s.variations, {}, set())
    full = [a for r in play(whole, table, judge) for a in r]

    # A run killed after its first round: the catalog holds those attempts.
    partial = QuotaPlan(table, s.variations, {}, set())
    first = play(partial, table, judge, rounds=1)[0]
    by_key = {(r["row_key"], r["variation"]): r["image_id"] for r in table.column("request").to_pylist()}
    catalog = {by_key[a]: judge({"row_key": a[0], "variation": a[1]}) for a in first}
    rerun = QuotaPlan(table, s.variations, catalog, set(catalog))
    rest = [a for r in play(rerun, table, judge) for a in r]
    assert not set(first) & set(rest)
    assert sorted(first + rest) == sorted(full)
    assert rerun.report()["short"] == whole.report()["short"]


def test_reviewers_decisions_count_over_qc():
    outcomes = {"a": Outcome("review"), "b": Outcome("accepted"), "c": Outcome("failed", error="oom")}
    decided = apply_decisions(outcomes, {"a": "approved", "b": "rejected", "c": "approved"})
    assert decided["a"].status == "accepted" and decided["b"].status == "rejected"
    assert decided["c"].status == "failed"


# --- monthly budgets ----------------------------------------------------------------------------


def spend_table(rows):
    return pa.table(
        {
            "tags": pa.array([list(t.items()) for t, _, _, _ in rows], pa.map_(pa.string(), pa.string())),
            "created_at": pa.array([c for _, c, _, _ in rows], pa.timestamp("us", tz="UTC")),
            "cost_usd": [u for _, _, u, _ in rows],
            "run_id": [r for _, _, _, r in rows],
        }
    )


def test_monthly_spend_counts_the_tagged_images_of_the_month():
    budgets = MonthlyBudgets.parse({"campaign=spring": 1.0, "team=studio": 5})
    table = spend_table(
        [
            ({"campaign": "spring", "team": "studio"}, datetime(2026, 3, 2, tzinfo=UTC), 0.25, "r1"),
            ({"campaign": "spring"}, datetime(2026, 3, 30, tzinfo=UTC), 0.5, "r2"),
            ({"campaign": "spring"}, datetime(2026, 4, 1, tzinfo=UTC), 9.0, "r3"),  # another month
            ({"campaign": "autumn"}, datetime(2026, 3, 5, tzinfo=UTC), 9.0, "r4"),  # another campaign
        ]
    )
    spring, studio = budgets.spend(table, "2026-03")
    assert (spring.spent_usd, spring.images, spring.runs, spring.left_usd) == (0.75, 2, 2, 0.25)
    assert (studio.spent_usd, studio.images) == (0.25, 1)
    tags = {"campaign": "spring"}
    assert budgets.check_run(tags, [spring, studio], estimate_usd=0.2) == pytest.approx(0.25)
    with pytest.raises(MonthlyBudgetExceeded, match=r"campaign=spring .* less than this run's estimate of \$0.3000"):
        budgets.check_run(tags, [spring, studio], estimate_usd=0.3)
    assert budgets.check_run(tags, [spring, studio], estimate_usd=0.3, force=True) is None
    assert budgets.check_run({"campaign": "autumn"}, [spring, studio], estimate_usd=99) is None  # no budget
    (spent,) = MonthlyBudgets.parse({"campaign=spring": 0.75}).spend(table, "2026-03")
    with pytest.raises(MonthlyBudgetExceeded, match="is spent.*--force"):
        MonthlyBudgets.parse({"campaign=spring": 0.75}).check_run(tags, [spent], estimate_usd=0.0)


def test_monthly_budgets_in_the_price_table_are_checked(tmp_path):
    good = tmp_path / "prices.yaml"
    good.write_text("monthly_budgets: {campaign=spring: 500.0}\n")
    assert PriceTable.from_yaml(str(good)).monthly_budgets == {"campaign=spring": 500.0}
    for text, words in (
        ("monthly_budgets: {spring: 5}\n", "not TAG=VALUE"),
        ("monthly_budgets: {campaign=spring: -1}\n", "finite amount"),
        ("monthly_budgets: {campaign=spring: lots}\n", "not an amount"),
    ):
        good.write_text(text)
        with pytest.raises(ValueError, match=words):
            PriceTable.from_yaml(str(good))
