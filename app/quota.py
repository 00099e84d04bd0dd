"""A quota per row: N accepted images, at most M attempts (`variations.accepted_per_row`,
`max_attempts_per_row`). No Ray here: the bulk job (jobs/generate.py) asks this plan what to
render in each round and tells it what came out.

1. Expansion makes every attempt's request up front: attempt i of a row has variation i's seed,
   so its image_id is fixed and a rerun makes the same attempts. A row's attempts in one
   combination share a `row_group` (app/request.py `row_group_id`): the pixel-deciding fields
   without the seed.
2. Round after round, each group still short of N accepted images gets as many of its next
   untried attempts as it lacks accepted images; a group never overshoots, and the attempts it
   ends with are the shortest prefix of its attempts that holds N accepted ones (or all M).
3. What counts comes from the catalog: images of earlier runs (a killed run, a partial one) count
   towards the quota, and an id already in the catalog is never rendered again; within the run,
   every id is tried once (a failed render is not retried in the same run: a rerun retries it).

`RequestQuota` is the same loop for one prompt of the native HTTP API (`/v1/generate`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from app.budget import BUDGET_ERROR
from app.spec import Variations

# Of several catalog rows for one id (a failed render rendered again), the best outcome holds.
_RANK = {"accepted": 3, "review": 2, "rejected": 1, "failed": 0}


@dataclass
class RowGroup:
    """One row's attempts in one combination, in attempt order."""

    key: str  # the row_group id
    row_key: str
    combination: str
    tier: str
    template: str
    attempts: list[tuple[int, str, int]] = field(default_factory=list)  # (variation, image_id, row in requests)


@dataclass(frozen=True)
class Outcome:
    status: str
    reasons: tuple[str, ...] = ()
    error: str = ""

    @property
    def why(self) -> list[str]:
        """Why it does not count: its QC reasons, or its error's kind and text."""
        if self.status == "failed":
            return [self.error or "failed"]
        return list(self.reasons) or [self.status]


class QuotaPlan:
    """The rounds of one run (see the module's docstring).

    `requests`: every expanded attempt that can render (status pending; duplicates allowed);
    `outcomes`: image_id -> Outcome of what the catalog holds; `done`: ids a rerun must not render
    again (`CatalogStore.done_ids`)."""

    def __init__(self, requests: pa.Table, variations: Variations, outcomes: dict[str, Outcome], done: set[str]):
        if variations.accepted_per_row is None:
            raise ValueError("a quota plan needs variations.accepted_per_row")
        self.wanted = variations.accepted_per_row
        self.max_attempts = variations.attempts_per_row
        self.counted = {"accepted", "review"} if variations.review_counts_as_accepted else {"accepted"}
        self.requests = requests
        self.outcomes = dict(outcomes)
        self.done = set(done)
        self.tried_now: set[str] = set()  # ids handed out in this run
        self.rounds = 0
        self.groups: dict[str, RowGroup] = {}
        seen: set[str] = set()
        for i, req in enumerate(requests.column("request").to_pylist()):
            image_id = req["image_id"]
            if image_id in seen:
                continue
            seen.add(image_id)
            template = (req.get("template") or {}).get("name") or ""
            group = self.groups.setdefault(
                req["row_group"],
                RowGroup(req["row_group"], req["row_key"], req["combination"], req["tier"], template),
            )
            group.attempts.append((int(req["variation"]), image_id, i))
        for group in self.groups.values():
            group.attempts.sort()

    def accepted(self, group: RowGroup) -> int:
        return sum(1 for _, image_id, _ in group.attempts if self._counts(image_id))

    def tried(self, group: RowGroup) -> list[str]:
        """Ids of the group's attempts made so far, in this run or before (one a budget stopped
        before it started is not an attempt: a rerun makes it)."""
        return [
            image_id
            for _, image_id, _ in group.attempts
            if (image_id in self.done or image_id in self.tried_now) and not self._refused(image_id)
        ]

    def next_round(self) -> pa.Table:
        """The attempts to render next (rows of `requests`); empty when every group is done."""
        rows: list[int] = []
        for group in self.groups.values():
            need = self.wanted - self.accepted(group)
            if need <= 0:
                continue
            untried = [(image_id, i) for _, image_id, i in group.attempts if image_id not in self.done]
            untried = [(image_id, i) for image_id, i in untried if image_id not in self.tried_now]
            for image_id, i in untried[:need]:
                self.tried_now.add(image_id)
                rows.append(i)
        if rows:
            self.rounds += 1
        return self.requests.take(pa.array(sorted(rows), type=pa.int64()))

    def record(self, outcomes: Iterable[tuple[str, Outcome]]) -> None:
        """What the catalog now says of ids rendered in this run."""
        for image_id, outcome in outcomes:
            self._merge(image_id, outcome)

    def report(self, stopped_on_budget: bool = False) -> dict:
        """The summary's `quota`: totals and every group that ended short, with why."""
        short = []
        met = 0
        for group in self.groups.values():
            accepted, tried = self.accepted(group), self.tried(group)
            if accepted >= self.wanted:
                met += 1
                continue
            reasons: Counter[str] = Counter()
            for image_id in tried:
                outcome = self.outcomes.get(image_id)
                if outcome is not None and not self._counts(image_id):
                    reasons.update(outcome.why)
            if len(tried) >= self.max_attempts or len(tried) >= len(group.attempts):
                why = "out of attempts"
            elif stopped_on_budget:
                why = "stopped on budget"
            else:
                why = "attempts left for a rerun"  # failed renders this run did not retry
            short.append(
                {
                    "row_key": group.row_key,
                    "combination": group.combination,
                    "tier": group.tier,
                    "template": group.template,
                    "row_group": group.key,
                    "accepted": accepted,
                    "attempts": len(tried),
                    "why": why,
                    "reasons": dict(reasons.most_common()),
                }
            )
        attempts = sum(len(self.tried(g)) for g in self.groups.values())
        return {
            "accepted_per_row": self.wanted,
            "max_attempts_per_row": self.max_attempts,
            "review_counts": "review" in self.counted,
            "groups": len(self.groups),
            "met": met,
            "attempts": attempts,
            "attempts_this_run": len(self.tried_now),
            "rounds": self.rounds,
            "short": sorted(short, key=lambda s: (s["row_key"], s["combination"], s["tier"])),
        }

    def _refused(self, image_id: str) -> bool:
        outcome = self.outcomes.get(image_id)
        return outcome is not None and outcome.status == "failed" and outcome.error.startswith(BUDGET_ERROR)

    def _counts(self, image_id: str) -> bool:
        outcome = self.outcomes.get(image_id)
        return outcome is not None and outcome.status in self.counted

    def _merge(self, image_id: str, outcome: Outcome) -> None:
        old = self.outcomes.get(image_id)
        if old is None or _RANK.get(outcome.status, 0) >= _RANK.get(old.status, 0):
            self.outcomes[image_id] = outcome


def apply_decisions(outcomes: dict[str, Outcome], decisions: dict[str, str]) -> dict[str, Outcome]:
    """People's review decisions in force (app/review.py): an approved image counts as accepted,
    a rejected one as rejected, whatever QC said."""
    out = dict(outcomes)
    for image_id, decision in decisions.items():
        old = out.get(image_id)
        if old is None or old.status == "failed":
            continue
        if decision == "approved":
            out[image_id] = Outcome("accepted", old.reasons)
        elif decision == "rejected":
            out[image_id] = Outcome("rejected", (*old.reasons, "rejected by a reviewer"))
    return out


def outcomes_from_catalog(table: pa.Table) -> dict[str, Outcome]:
    """image_id -> its best Outcome, from catalog columns image_id, status, reasons, error."""
    out: dict[str, Outcome] = {}
    cols = [table.column(c).to_pylist() for c in ("image_id", "status", "reasons", "error")]
    for image_id, status, reasons, error in zip(*cols):
        outcome = Outcome(status or "failed", tuple(reasons or ()), error or "")
        old = out.get(image_id)
        if old is None or _RANK.get(outcome.status, 0) >= _RANK.get(old.status, 0):
            out[image_id] = outcome
    return out


# --- one HTTP request's quota (the Serve app's /v1/generate) ---------------------------------------


@dataclass
class RequestQuota:
    """`accepted_per_row` (and a cost cap) on one prompt of the native API: rounds of renders
    with seeds first, first + 1, … until `wanted` images are accepted, `max_attempts` are spent or
    the next round would cross `max_cost_usd` (the run budget's ledger, app/budget.py, decides
    how many of a round may start: exact to one round)."""

    wanted: int | None  # None: no quota, one round of n images
    max_attempts: int
    max_cost_usd: float | None = None
    review_counts: bool = False

    @classmethod
    def of(
        cls, accepted: int | None, max_attempts: int | None, max_cost_usd: float | None, review: bool = False
    ) -> RequestQuota | None:
        """The request's quota, or None when it asks for neither a quota nor a cost cap."""
        if accepted is None and max_cost_usd is None:
            return None
        if accepted is not None and max_attempts is not None and max_attempts < accepted:
            raise ValueError(f"max_attempts ({max_attempts}) is below accepted_per_row ({accepted})")
        attempts = max_attempts or (3 * accepted if accepted is not None else 1_000_000)
        return cls(accepted, attempts, max_cost_usd, review)

    async def render(self, render_round, seed: int | None, n: int) -> tuple[list, list, dict]:
        """`render_round(seed, n)` -> (requests, images with .status, .reasons, .cost_usd);
        returns every round's requests and images and the quota's report. `seed` None or -1:
        a random first seed, attempt k has first + k."""
        import secrets

        from app.budget import RunBudget

        first_seed = secrets.randbelow(2**62) if seed is None or seed < 0 else seed

        ledger = RunBudget(max_cost_usd=self.max_cost_usd)
        counted = {"accepted", "review"} if self.review_counts else {"accepted"}
        requests: list = []
        images: list = []
        accepted = rounds = 0
        while True:
            want = (self.wanted - accepted) if self.wanted is not None else n
            size = min(want, self.max_attempts - len(requests))
            if size <= 0 or (self.wanted is None and rounds):
                break
            name = f"round-{rounds}"
            allowed = ledger.admit(name, size) if self.max_cost_usd is not None else size
            if allowed <= 0:
                break
            reqs, ims = await render_round(first_seed + len(requests), allowed)
            rounds += 1
            ledger.settle(name, len(ims), sum(float(getattr(im, "cost_usd", 0.0)) for im in ims), 0.0)
            requests += reqs
            images += ims
            accepted += sum(1 for im in ims if im.status in counted)
            if self.wanted is None:
                break
        reasons: Counter[str] = Counter()
        for im in images:
            if im.status not in counted:
                reasons.update(list(im.reasons) or [im.error or im.status])
        state = ledger.snapshot()
        report = {
            "accepted_per_row": self.wanted,
            "max_attempts": self.max_attempts,
            "max_cost_usd": self.max_cost_usd,
            "accepted": accepted,
            "attempts": len(requests),
            "rounds": rounds,
            "met": self.wanted is None or accepted >= self.wanted,
            "spent_usd": state["spent_usd"],
            "stopped_on_budget": state["stopped"],
            "reasons": dict(reasons.most_common()),
        }
        return requests, images, report
