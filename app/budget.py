"""A run's budget: a cost cap and a device-seconds cap that stop it starting new work.

`RunBudget` is the ledger, held by one Ray actor per run so that every generator (diffusers pools
and remote backends alike) draws on the same account. A generator asks it before each batch
(`admit`: how many of these images may start) and settles the batch when it is rendered (`settle`:
what it really cost). An image is admitted only while what is spent, plus what is reserved for
batches in flight, plus its own estimate stays within every cap:
- the estimate per image is the mean of the images settled so far; before any, a remote backend's
  known price per image, else nothing is known, and a batch starts only when no other is in
  flight, so the first batch's real cost is learned before a second one is admitted;
- once a batch is cut short, the run is stopped on budget: no later batch starts, the batches in
  flight finish, and every image not admitted becomes a failed catalog row
  `budget_exhausted: …` (a later run with a larger budget renders them: such rows are not "done").

`Budgeted` wraps a generator stage class (Generator, GeneratorWithClip, RemoteGenerator) with
that protocol. Costs are the catalog's: device seconds at the price table's rate for the
accelerator, plus a remote backend's API price.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from app.cost import PriceTable, parse_monthly_budgets

BUDGET_ERROR = "budget_exhausted"


@dataclass
class BudgetState:
    max_cost_usd: float | None
    max_device_seconds: float | None
    spent_usd: float = 0.0
    spent_device_seconds: float = 0.0
    settled_images: int = 0
    admitted_images: int = 0
    refused_images: int = 0
    stopped: bool = False
    stopped_because: str = ""
    reserved: dict = field(default_factory=dict)  # batch -> (images, usd, device seconds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("reserved")
        return d


class RunBudget:
    """The ledger of one run (see the module's docstring). Thread-safe; no Ray needed to use it."""

    def __init__(self, max_cost_usd: float | None = None, max_device_seconds: float | None = None):
        for name, cap in (("max_cost_usd", max_cost_usd), ("max_device_seconds", max_device_seconds)):
            if cap is not None and not (math.isfinite(cap) and cap >= 0):
                raise ValueError(f"budget.{name} must be a finite number ≥ 0, got {cap}")
        self.state = BudgetState(max_cost_usd, max_device_seconds)
        self._lock = threading.Lock()

    def admit(self, batch: str, images: int, usd_per_image: float | None = None) -> int:
        """How many of a batch's `images` may start (a prefix of them); reserves their estimate.
        `usd_per_image`: a known price (a remote backend's), used until real costs are settled."""
        with self._lock:
            s = self.state
            if s.stopped or images <= 0:
                s.refused_images += max(0, images)
                return 0
            for cap, spent in ((s.max_cost_usd, s.spent_usd), (s.max_device_seconds, s.spent_device_seconds)):
                if cap is not None and spent >= cap:
                    return self._refuse(images, "cap")
            usd, device = self._estimate(usd_per_image)
            if usd is None:  # nothing known: one batch at a time until the first is settled
                allowed = images if not s.reserved else 0
                if allowed:
                    s.reserved[batch] = (allowed, 0.0, 0.0)
                    s.admitted_images += allowed
                    return allowed
                return self._refuse(images, "waiting")
            reserved_usd = sum(r[1] for r in s.reserved.values())
            reserved_dev = sum(r[2] for r in s.reserved.values())
            allowed = images
            for cap, spent, held, each in (
                (s.max_cost_usd, s.spent_usd, reserved_usd, usd),
                (s.max_device_seconds, s.spent_device_seconds, reserved_dev, device),
            ):
                if cap is not None and each > 0:
                    allowed = min(allowed, max(0, math.floor((cap - spent - held) / each + 1e-9)))
                elif cap is not None and spent + held > cap:
                    allowed = 0
            if allowed:
                s.reserved[batch] = (allowed, allowed * usd, allowed * device)
                s.admitted_images += allowed
            if allowed < images:
                self._refuse(images - allowed, "cap")
            return allowed

    def wait_or_refuse(self, batch: str, images: int, usd_per_image: float | None = None) -> int | None:
        """`admit`, except None (instead of 0) while the first batch's cost is still being learned."""
        with self._lock:
            learning = not self.state.stopped and self._estimate(usd_per_image)[0] is None and bool(self.state.reserved)
        return None if learning else self.admit(batch, images, usd_per_image)

    def settle(self, batch: str, images: int, usd: float, device_seconds: float) -> None:
        """A batch's real cost, once rendered; its reservation is released."""
        with self._lock:
            s = self.state
            s.reserved.pop(batch, None)
            s.spent_usd += usd
            s.spent_device_seconds += device_seconds
            s.settled_images += images

    def snapshot(self) -> dict:
        with self._lock:
            return self.state.to_dict()

    def _estimate(self, usd_per_image: float | None) -> tuple[float | None, float]:
        s = self.state
        if s.settled_images:
            return s.spent_usd / s.settled_images, s.spent_device_seconds / s.settled_images
        if usd_per_image is not None:
            return usd_per_image, 0.0
        return None, 0.0

    def _refuse(self, images: int, why: str) -> int:
        s = self.state
        if why == "cap":
            s.refused_images += images
            if not s.stopped:
                s.stopped = True
                caps = []
                if s.max_cost_usd is not None:
                    caps.append(f"cost cap ${s.max_cost_usd:g} (${s.spent_usd:.4f} spent)")
                if s.max_device_seconds is not None:
                    caps.append(f"device cap {s.max_device_seconds:g} s ({s.spent_device_seconds:.1f} s spent)")
                s.stopped_because = "; ".join(caps)
        return 0


def budget_error(state: dict) -> str:
    return (
        f"{BUDGET_ERROR}: the run stopped on budget ({state.get('stopped_because') or 'cap reached'}); "
        f"a run with a larger budget renders it"
    )


class Budgeted:
    """A generator stage that asks the run's budget before each batch (see the module's docstring).

    `budget`: the RunBudget actor's handle; `stage` and `stage_kwargs`: the wrapped stage."""

    def __init__(self, budget, stage, stage_kwargs: dict, usd_per_image: float | None = None, prices=None):
        self.budget = budget
        self.inner = stage(**stage_kwargs)
        self.usd_per_image = usd_per_image
        self.prices = prices or PriceTable()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        import ray

        n = len(batch["image_id"])
        pending = [i for i in range(n) if batch["status"][i] == "pending"]
        name = uuid.uuid4().hex
        allowed: int | None = None
        while allowed is None:  # the first batch's cost is being learned by another generator
            allowed = ray.get(self.budget.wait_or_refuse.remote(name, len(pending), self.usd_per_image))
            if allowed is None:
                time.sleep(0.2)
        status, error = np.array(batch["status"], dtype=object), np.array(batch["error"], dtype=object)
        if allowed < len(pending):
            message = budget_error(ray.get(self.budget.snapshot.remote()))
            for i in pending[allowed:]:
                status[i], error[i] = "failed", message
        try:
            out = self.inner({**batch, "status": status, "error": error})
        except BaseException:
            ray.get(self.budget.settle.remote(name, 0, 0.0, 0.0))
            raise
        rendered = pending[:allowed]
        usd, device = self._cost(out, rendered)
        ray.get(self.budget.settle.remote(name, len(rendered), usd, device))
        return out

    def _cost(self, out: dict, rows: list[int]) -> tuple[float, float]:
        """What the rendered rows cost, as the catalog will say: device time at its price, plus API prices."""
        usd = device = 0.0
        for i in rows:
            seconds = float(out["gpu_seconds"][i])
            device += seconds
            accelerator = str(out["accelerator"][i]) if "accelerator" in out else ""
            usd += self.prices.image_cost(accelerator, seconds, 0.0) if accelerator else 0.0
            lineage = out.get("backend")
            if lineage is not None and lineage[i]:
                value = json.loads(lineage[i]) if isinstance(lineage[i], str) else dict(lineage[i])
                usd += float(value.get("api_cost_usd") or 0.0)
        return usd, device


# --- monthly budgets per team or campaign tag ----------------------------------------------------


@dataclass(frozen=True)
class MonthlyBudget:
    """USD a calendar month (UTC) for the images tagged `tag=value`."""

    tag: str
    value: str
    usd: float

    @property
    def key(self) -> str:
        return f"{self.tag}={self.value}"

    def matches(self, tags: dict) -> bool:
        return str(tags.get(self.tag, "")) == self.value


@dataclass(frozen=True)
class MonthlySpend:
    budget: MonthlyBudget
    month: str  # YYYY-MM
    spent_usd: float
    images: int
    runs: int

    @property
    def left_usd(self) -> float:
        return self.budget.usd - self.spent_usd

    def to_dict(self) -> dict:
        return {
            "budget": self.budget.key,
            "month": self.month,
            "budget_usd": self.budget.usd,
            "spent_usd": self.spent_usd,
            "left_usd": self.left_usd,
            "images": self.images,
            "runs": self.runs,
        }


class MonthlyBudgetExceeded(ValueError):
    """A run that would cross a monthly budget; the message names the budget, spend and estimate."""


@dataclass(frozen=True)
class MonthlyBudgets:
    """The price table's `monthly_budgets` (app/cost.py): spend per month from the catalog's
    `cost_usd` (what each image cost when it was written), and the check before a run starts."""

    budgets: tuple[MonthlyBudget, ...] = ()

    @classmethod
    def parse(cls, data: dict | None) -> MonthlyBudgets:
        """The price table's `monthly_budgets`; ValueError naming a bad key or amount."""
        return cls(tuple(MonthlyBudget(tag, value, usd) for tag, value, usd in parse_monthly_budgets(data)))

    def matching(self, tags: dict) -> list[MonthlyBudget]:
        return [b for b in self.budgets if b.matches(tags)]

    def spend(self, catalog, month: str) -> list[MonthlySpend]:
        """Each budget's spend in `month` (YYYY-MM) over catalog columns tags, created_at, cost_usd, run_id."""
        check_month(month)
        cols = {c: catalog.column(c).to_pylist() for c in catalog.column_names}
        usd = {b.key: 0.0 for b in self.budgets}
        images = {b.key: 0 for b in self.budgets}
        runs: dict[str, set] = {b.key: set() for b in self.budgets}
        run_ids = cols.get("run_id") or [""] * catalog.num_rows
        for tags, created, cost, run in zip(cols["tags"], cols["created_at"], cols["cost_usd"], run_ids):
            if created is None or f"{created:%Y-%m}" != month:
                continue
            tag_map = dict(tags or [])
            for b in self.budgets:
                if b.matches(tag_map):
                    usd[b.key] += float(cost or 0.0)
                    images[b.key] += 1
                    runs[b.key].add(run)
        return [MonthlySpend(b, month, usd[b.key], images[b.key], len(runs[b.key])) for b in self.budgets]

    def check_run(
        self, tags: dict, spend: list[MonthlySpend], estimate_usd: float, force: bool = False
    ) -> float | None:
        """What the run may spend under its tags' budgets (None: no budget applies, or forced).

        A run refuses to start (MonthlyBudgetExceeded) when a matching budget is already spent or
        its estimate would cross one, unless `force`."""
        applies = [s for s in spend if s.budget.matches(tags)]
        if not applies or force:
            return None
        for s in applies:
            if s.left_usd <= 0 or estimate_usd > s.left_usd + 1e-12:
                state = (
                    "is spent"
                    if s.left_usd <= 0
                    else f"has ${s.left_usd:.4f} left, less than this run's estimate of ${estimate_usd:.4f}"
                )
                raise MonthlyBudgetExceeded(
                    f"monthly budget {s.budget.key} (${s.budget.usd:g} in {s.month}) {state}: "
                    f"${s.spent_usd:.4f} spent on {s.images} image(s) in {s.runs} run(s). "
                    "Nothing was rendered; raise the budget in the price table, or pass --force to run anyway"
                )
        return min(s.left_usd for s in applies)


def check_month(month: str) -> str:
    import re

    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
        raise ValueError(f"month {month!r} is not YYYY-MM")
    return month


def current_month() -> str:
    from datetime import UTC, datetime

    return f"{datetime.now(UTC):%Y-%m}"


def render_spend(spend: list[MonthlySpend], prices_from: str) -> str:
    if not spend:
        return f"no monthly budgets in the price table ({prices_from}): add monthly_budgets: {{TAG=VALUE: USD}}"
    lines = [f"monthly budgets in {spend[0].month} (prices: {prices_from})"]
    for s in spend:
        share = f"{s.spent_usd / s.budget.usd:.1%}" if s.budget.usd else "-"
        flag = "  OVER" if s.left_usd < 0 else ("  SPENT" if s.left_usd == 0 and s.budget.usd else "")
        lines.append(
            f"  {s.budget.key:32s} ${s.spent_usd:10.4f} of ${s.budget.usd:g} ({share}), ${s.left_usd:.4f} left; "
            f"{s.images} image(s) in {s.runs} run(s){flag}"
        )
    return "\n".join(lines)
