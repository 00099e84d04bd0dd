"""The report's plots: plain data in, PNG bytes out.

Figures are built with matplotlib's object API (Figure + Agg canvas), never pyplot, so nothing
global is switched and the report can run inside any process.
"""

from __future__ import annotations

import io
from datetime import datetime

OUTCOME_COLOURS = {"accepted": "#2e7d32", "review": "#f9a825", "rejected": "#c62828", "failed": "#9e9e9e"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    # No layout engine: constrained layout measured every artist's extent before each save (about
    # half of a plot's time); each plot sets its margins from what it holds instead (_margins).
    return Figure(figsize=(width, height), dpi=100)


def _margins(fig, *, left_chars: int = 0, top_in: float = 0.35, bottom_in: float = 0.5) -> None:
    """Fixed margins in inches: room on the left for y tick labels of up to left_chars characters
    (at the default 10 pt font, about 0.075 in a character), above for a title or legend, below
    for the x axis and its label."""
    width, height = fig.get_size_inches()
    left_in = 0.25 + 0.075 * max(left_chars, 5)
    fig.subplots_adjust(
        left=min(left_in / width, 0.6),
        right=1 - 0.2 / width,
        top=1 - top_in / height,
        bottom=bottom_in / height,
    )


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def acceptance_bars(labels: list[str], counts: dict[str, list[int]]) -> bytes:
    """Horizontal stacked bars: one per combination, images by outcome."""
    fig = _figure(9, 0.9 + 0.5 * max(len(labels), 1))
    ax = fig.add_subplot()
    left = [0] * len(labels)
    for outcome, colour in OUTCOME_COLOURS.items():
        values = counts.get(outcome, [0] * len(labels))
        ax.barh(labels, values, left=left, color=colour, label=outcome)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.legend(ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    _margins(fig, left_chars=max((len(label) for label in labels), default=0), top_in=0.4)
    return _png(fig)


def score_histograms(scores: dict[str, tuple[list[float], dict[str, list[int]]]]) -> bytes:
    """One panel per QC score, a histogram per outcome, from counts binned by the query
    (analysis/report.py): scores: {score: (bin edges, {outcome: count per bin})}."""
    fig = _figure(9, 2.8)
    axes = fig.subplots(1, len(scores))
    for ax, (name, (edges, by_outcome)) in zip(axes, scores.items()):
        for outcome, counts in by_outcome.items():
            if any(counts):
                # one filled outline per outcome (ax.hist drew a rectangle per bin: the same picture)
                ax.stairs(counts, edges, fill=True, alpha=0.6, color=OUTCOME_COLOURS.get(outcome), label=outcome)
        ax.set_title(name)
        ax.set_ylabel("images")
    axes[0].legend(frameon=False, fontsize="small")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.12, wspace=0.35)
    return _png(fig)


def cost_bars(labels: list[str], parts: dict[str, list[float]]) -> bytes:
    """Horizontal stacked bars of USD per combination: device, CPU, storage a month."""
    fig = _figure(9, 0.9 + 0.5 * max(len(labels), 1))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for (name, values), colour in zip(parts.items(), ("#1565c0", "#6a1b9a", "#00838f")):
        ax.barh(labels, values, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("USD")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    _margins(fig, left_chars=max((len(label) for label in labels), default=0), top_in=0.4, bottom_in=0.55)
    return _png(fig)


def throughput(series: dict[str, tuple[list[datetime], list[int]]]) -> bytes:
    """Images written over time, cumulative, one line per run: {run: (times, images written by
    then)}, from catalog `created_at` (a large run's curve comes as a few hundred of its points)."""
    fig = _figure(9, 3.2)
    ax = fig.add_subplot()
    for run, (times, written) in series.items():
        ax.step(times, written, where="post", label=run)
    ax.set_ylabel("images written (cumulative)")
    ax.set_xlabel("time (UTC)")
    if len(series) <= 8:
        ax.legend(frameon=False, fontsize="small")
    fig.autofmt_xdate()
    _margins(fig, left_chars=8, top_in=0.15, bottom_in=0.85)
    return _png(fig)
