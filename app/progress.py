"""A bulk run's progress in the product's terms: images done of the total, outcomes so far,
images/s, ETA and cost so far.

One live bar, redrawn in place, on a terminal; a plain line every `every_s` seconds otherwise
(logs, CI, `ray job logs`). Fed by the driver with each finished batch's small result columns;
imports no Ray, so it is tested by feeding it batches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

OUTCOMES = ("accepted", "review", "rejected", "failed")


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class RunProgress:
    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        bar_width: int = 24,
    ):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live
        self.every_s = every_s
        self.clock = clock
        self.bar_width = bar_width
        self.started = clock()
        self.done = 0
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.cost_usd = 0.0
        self._last_line_at: float | None = None
        self._shown_done = 0
        self._drawn = False

    # --- feeding -------------------------------------------------------------------------------

    def add(self, statuses: Sequence[Any], cost_usd: float = 0.0) -> None:
        """One finished batch: each image's status, and the batch's cost."""
        for status in statuses:
            key = str(status)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.done += len(statuses)
        self.cost_usd += cost_usd
        self._show()

    def add_batch(self, out: Mapping[str, Any]) -> None:
        """A batch of the CPU stage's per-image results (`status`, and `cost_usd` when present)."""
        cost = out.get("cost_usd")
        self.add(list(out["status"]), float(sum(cost)) if cost is not None else 0.0)

    def close(self) -> None:
        """The final state: the bar finished with a newline, or a last line if there is news."""
        if self.live:
            if self._drawn:
                self.stream.write("\r\x1b[2K" + self.bar() + "\n")
                self.stream.flush()
        elif self.done != self._shown_done:
            self._write_line()

    # --- what is shown ----------------------------------------------------------------------------

    @property
    def images_per_second(self) -> float:
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        rate = self.images_per_second
        return (self.total - self.done) / rate if rate > 0 and self.done < self.total else None

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        outcomes = "  ".join(f"{k} {self.counts.get(k, 0)}" for k in OUTCOMES if k != "failed" or self.counts["failed"])
        eta = self.eta_seconds()
        return (
            f"{self.done}/{self.total} images{pct}  {outcomes}  {self.images_per_second:.2f} images/s  "
            f"ETA {_duration(eta) if eta is not None else '-'}  cost ${self.cost_usd:.4f}"
        )

    def bar(self) -> str:
        filled = int(self.bar_width * self.done / self.total) if self.total else self.bar_width
        return "[" + "#" * filled + "." * (self.bar_width - filled) + "] " + self.line()

    def _show(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + self.bar())
            self.stream.flush()
            self._drawn = True
            return
        now = self.clock()
        if self._last_line_at is None or now - self._last_line_at >= self.every_s or self.done >= self.total:
            self._write_line()

    def _write_line(self) -> None:
        self._last_line_at, self._shown_done = self.clock(), self.done
        self.stream.write("progress " + self.line() + "\n")
        self.stream.flush()
