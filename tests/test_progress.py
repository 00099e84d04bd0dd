"""The run's progress display, fed batches by hand with a controlled clock (no Ray)."""

from __future__ import annotations

import io

import numpy as np

from app.progress import RunProgress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_periodic_lines_off_a_terminal_say_done_outcomes_rate_eta_and_cost():
    clock, out = Clock(), io.StringIO()
    p = RunProgress(10, stream=out, every_s=30, clock=clock)
    assert not p.live  # a StringIO is no terminal
    clock.now += 4
    p.add(["accepted", "accepted", "review", "rejected"], cost_usd=0.002)
    first = out.getvalue().splitlines()
    assert first == [
        "progress 4/10 images (40%)  accepted 2  review 1  rejected 1  1.00 images/s  ETA 6s  cost $0.0020"
    ]
    clock.now += 10
    p.add(["accepted", "failed"], cost_usd=0.001)  # within 30 s of the last line: nothing new
    assert out.getvalue().splitlines() == first
    clock.now += 30
    p.add(["accepted"])
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("progress 7/10 images (70%)  accepted 4  review 1  rejected 1  failed 1")
    assert "ETA 19s" in last and "cost $0.0030" in last  # 7 images in 44 s: 3 left at 0.16/s


def test_the_last_batch_always_prints_and_close_adds_nothing_twice():
    clock, out = Clock(), io.StringIO()
    p = RunProgress(3, stream=out, every_s=600, clock=clock)
    p.add(["accepted"])
    clock.now += 1
    p.add(["review", "accepted"])
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("progress 3/3 images (100%)") and "ETA -" in lines[-1]


def test_close_prints_the_state_a_throttled_line_left_out():
    clock, out = Clock(), io.StringIO()
    p = RunProgress(10, stream=out, every_s=600, clock=clock)
    p.add(["accepted"])
    p.add(["accepted"])
    p.close()  # a run that ends early (failures, a limit): its final count is still shown
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == [
        "progress 1/10 images (10%)",
        "progress 2/10 images (20%)",
    ]


def test_a_terminal_gets_one_bar_redrawn_in_place():
    clock, out = Clock(), Tty()
    p = RunProgress(4, stream=out, clock=clock, bar_width=8)
    assert p.live
    for _ in range(4):
        clock.now += 2
        p.add(["accepted"], cost_usd=0.01)
    p.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line on screen at the end
    assert text.count("\r\x1b[2K") == 5
    final = text.rsplit("\r\x1b[2K", 1)[1]
    assert final.startswith("[########] 4/4 images (100%)  accepted 4  review 0  rejected 0  0.50 images/s")
    assert "cost $0.0400" in final


def test_fed_with_the_cpu_stages_result_columns():
    out = io.StringIO()
    p = RunProgress(3, stream=out, live=False)
    p.add_batch({"status": np.array(["accepted", "review", "accepted"], dtype=object), "cost_usd": np.array([0.1] * 3)})
    assert p.counts["accepted"] == 2 and p.counts["review"] == 1 and abs(p.cost_usd - 0.3) < 1e-9
    p.add_batch({"status": np.array([], dtype=object)})  # no cost column: counts, no cost
    assert p.done == 3
