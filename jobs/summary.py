"""The bulk job's run summary: counts, device and CPU time, throughput, per combination, per
generator and per mode, and for image-conditioned runs the kept-region figure (how far the kept
pixels of inpainted and outpainted images are from their input), folded batch by batch from the CPU
stage's per-image results (no Ray here)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    output: str
    input_rows: int = 0
    requests: int = 0
    skipped_existing: int = 0
    duplicates: int = 0
    rendered: int = 0
    counts: dict = field(default_factory=lambda: {"accepted": 0, "review": 0, "rejected": 0, "failed": 0})
    gpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    generators: int = 0
    accelerator: str = ""
    # The run's catalog partition: the day it started (a batch retried after midnight stays in it).
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d"))
    by_combination: dict = field(default_factory=dict)  # name -> {images, accepted, …, gpu_seconds}
    by_generator: dict = field(default_factory=dict)  # actor -> {base, images, lora_switches, switch_seconds}
    budget: dict = field(default_factory=dict)  # the run's budget ledger at the end (app/budget.py); {} without caps
    by_mode: dict = field(default_factory=dict)  # txt2img | img2img | … | upscale -> {images, accepted, …}
    # Inpainted and outpainted images: their kept_mean_abs (0-255) folded as count, sum and max.
    kept_images: int = 0
    kept_sum: float = 0.0
    kept_max: float = 0.0
    monthly_budgets: list = field(default_factory=list)  # the price table's budgets the run's tags matched
    quota: dict = field(default_factory=dict)  # accepted_per_row: rounds, rows met, rows short and why (app/quota.py)

    first_result_at: float = 0.0  # perf_counter of the first and last finished batch
    last_result_at: float = 0.0

    @property
    def streaming_images_per_second(self) -> float:
        """Throughput while images flow: from the first finished batch to the last, so the run's
        fixed start-up (reading, planning, actors loading models) does not count as a rate."""
        span = self.last_result_at - self.first_result_at
        return (self.rendered - self._first_batch) / span if span > 0 else 0.0

    def add_failed(self, out: dict) -> None:
        """Rows that failed before rendering (bad inputs and rows), as `CatalogWrite` returned them."""
        n = len(out["status"])
        self.counts["failed"] = self.counts.get("failed", 0) + n
        for i in range(n):
            self._add_mode(out, i, "failed")

    def _add_mode(self, out: dict, i: int, status: str) -> None:
        mode = str(out["mode"][i]) if "mode" in out else "txt2img"
        by_mode = self.by_mode.setdefault(mode, {"images": 0})
        by_mode["images"] += 1
        by_mode[status] = by_mode.get(status, 0) + 1
        kept = float(out["kept_mean_abs"][i]) if "kept_mean_abs" in out else math.nan
        if not math.isnan(kept):
            self.kept_images += 1
            self.kept_sum += kept
            self.kept_max = max(self.kept_max, kept)

    @property
    def kept_region(self) -> dict | None:
        """The run's kept-region figure: max and mean of kept_mean_abs over its inpainted and
        outpainted images, 0-255 and /255; None when it has none."""
        if not self.kept_images:
            return None
        mean = self.kept_sum / self.kept_images
        return {
            "images": self.kept_images,
            "max_mean_abs": self.kept_max,
            "mean_mean_abs": mean,
            "max_mean_abs_unit": self.kept_max / 255.0,
            "mean_mean_abs_unit": mean / 255.0,
        }

    def add_batch(self, out: dict) -> None:
        """Fold one batch of the CPU stage's per-image results into the totals."""
        n = len(out["status"])
        now = time.perf_counter()
        if not self.first_result_at:
            self.first_result_at, self._first_batch = now, n
        self.last_result_at = now
        self.rendered += n
        self.gpu_seconds += float(np.sum(out["gpu_seconds"]))
        self.cpu_seconds += float(np.sum(out["cpu_seconds"]))
        for i in range(n):
            status = str(out["status"][i])
            self.counts[status] = self.counts.get(status, 0) + 1
            combo = self.by_combination.setdefault(str(out["combination"][i]), {"images": 0, "gpu_seconds": 0.0})
            combo["images"] += 1
            combo[status] = combo.get(status, 0) + 1
            combo["gpu_seconds"] += float(out["gpu_seconds"][i])
            self._add_mode(out, i, status)
            gen = str(out["generator_id"][i])
            if gen:
                g = self.by_generator.setdefault(gen, {"base": str(out["base_model"][i]), "images": 0})
                g["images"] += 1
                # Cumulative counters from the actor: the largest seen is its total.
                g["lora_switches"] = max(g.get("lora_switches", 0), int(out["lora_switches"][i]))
                g["switch_seconds"] = max(g.get("switch_seconds", 0.0), float(out["lora_switch_seconds"][i]))

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.wall_seconds if self.wall_seconds > 0 else 0.0

    _first_batch: int = 0

    @property
    def stopped_on_budget(self) -> bool:
        return bool(self.budget.get("stopped"))

    def _budget_lines(self) -> list[str]:
        b = self.budget
        if not b:
            return []
        caps = ", ".join(
            f"{what} {b[key]:g}"
            for key, what in (("max_cost_usd", "cost $"), ("max_device_seconds", "device s"))
            if b.get(key) is not None
        )
        line = f"  budget        {caps}: spent ${b['spent_usd']:.4f}, {b['spent_device_seconds']:.1f} device s"
        if b.get("stopped"):
            line += f"; STOPPED on budget ({b['stopped_because']}): {b['refused_images']} image(s) not started"
        return [line]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "images_per_second": self.images_per_second,
            "streaming_images_per_second": self.streaming_images_per_second,
            "stopped_on_budget": self.stopped_on_budget,
            "kept_region": self.kept_region,
        }

    def _conditioned_lines(self) -> list[str]:
        """Per mode, and the kept-region figure, when the run had image-conditioned rows."""
        if set(self.by_mode) <= {"txt2img"}:
            return []
        lines = [
            f"  mode          {mode}: {m['images']} images, accepted {m.get('accepted', 0)}, "
            f"review {m.get('review', 0)}, rejected {m.get('rejected', 0)}, failed {m.get('failed', 0)}"
            for mode, m in sorted(self.by_mode.items())
        ]
        kept = self.kept_region
        if kept is not None:
            lines.append(
                f"  kept region   mean |output - input| outside the blend band over {kept['images']} "
                f"inpainted/outpainted images: max {kept['max_mean_abs']:.3f}/255 "
                f"({kept['max_mean_abs_unit']:.5f}), mean {kept['mean_mean_abs']:.3f}/255 "
                f"({kept['mean_mean_abs_unit']:.5f})"
            )
        return lines

    def render(self) -> str:
        c = self.counts
        return "\n".join(
            [
                f"run {self.run_id}  ({self.run_name})",
                f"  requests      {self.requests}  (skipped, already in catalog: {self.skipped_existing}; "
                f"duplicates in input: {self.duplicates})",
                f"  rendered      {self.rendered} on {self.generators} generator(s) [{self.accelerator}]",
                f"  outcome       accepted {c['accepted']}  review {c['review']}  rejected {c['rejected']}  failed {c['failed']}",
                f"  throughput    {self.images_per_second:.2f} images/s over {self.wall_seconds:.1f} s",
                f"  device time   {self.gpu_seconds:.1f} s   CPU (QC, post) {self.cpu_seconds:.1f} s",
                *[
                    f"  combination   {name}: {c['images']} images, accepted {c.get('accepted', 0)}, "
                    f"{c['gpu_seconds'] / max(1, c['images']):.3f} device s/image"
                    for name, c in sorted(self.by_combination.items())
                ],
                *[
                    f"  generator     {gid[:8]} ({g['base']}): {g['images']} images, {g['lora_switches']} LoRA switches "
                    f"in {g['switch_seconds']:.2f} s"
                    for gid, g in sorted(self.by_generator.items())
                ],
                *self._budget_lines(),
                *self._conditioned_lines(),
                *quota_lines(self.quota),
                *[
                    f"  monthly       {m['budget']} in {m['month']}: ${m['spent_usd']:.4f} of ${m['budget_usd']:g} "
                    f"spent before this run" + (" (--force)" if m["forced"] else "")
                    for m in self.monthly_budgets
                ],
                f"  images        {self.output}/images/",
                f"  catalog       {self.output}/catalog/  (date=…/run_id={self.run_id}/)",
                f"  summary       {self.output}/runs/{self.run_id}/summary.json",
            ]
        )


def quota_lines(quota: dict) -> list[str]:
    """The quota's outcome in words: rows met, and each row that ended short with its QC reasons."""
    if not quota:
        return []
    lines = [
        f"  quota         {quota['accepted_per_row']} accepted per row in at most {quota['max_attempts_per_row']} "
        f"attempts: {quota['met']} of {quota['groups']} row(s) met, {quota['attempts_this_run']} attempt(s) "
        f"in {quota['rounds']} round(s)"
    ]
    for s in quota["short"]:
        reasons = ", ".join(f"{why} x{n}" for why, n in s["reasons"].items()) or "-"
        lines.append(
            f"    short       {s['row_key']} [{s['combination']}/{s['tier']}]: {s['accepted']} accepted in "
            f"{s['attempts']} attempt(s), {s['why']}; {reasons}"
        )
    for r in quota.get("failed_rows", []):
        lines.append(f"    short       {r['row_key']}: 0 accepted, the row cannot render: {r['error']}")
    return lines
