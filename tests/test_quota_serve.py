"""`accepted_per_row` and `max_cost_usd` of the native API, on the Serve app's own parts called
directly (plan, the tiny generator, QC + post-processing + catalog): rounds of images until the
quota is met or the attempts are spent, seeds first, first + 1, …, and a cost cap that stops the
rounds exact to one round."""

from __future__ import annotations

import asyncio

import pytest

from app.expand import ResolvedModels
from app.qc import QcSettings
from app.quota import RequestQuota
from app.serve.config import ServeConfig
from app.serve.core import ImageJob, ServeCore, rendered_rows
from app.spec import ComputeSpec

CHECKS = ["nonfinite", "blank", "sharpness", "contrast", "exposure"]


@pytest.fixture(scope="module")
def generator(tiny_base):
    from app.generator import Generator

    return Generator(tiny_base, {}, ComputeSpec(device="cpu", cpu_threads=1, batch_size=4))


def serve(tmp_path, tiny_base, generator, min_sharpness: float):
    """The Serve app's `_render` for one round: plan, render, finish."""
    qc = QcSettings(min_sharpness=min_sharpness, review_sharpness=min_sharpness, enabled=CHECKS)
    core = ServeCore(ServeConfig(qc=qc, steps=2, output_uri=str(tmp_path)), ResolvedModels.single(tiny_base))

    async def render_round(seed: int, n: int):
        reqs = core.plan(ImageJob(prompt="a red leather boot", seed=seed, n=n))
        rows = rendered_rows(reqs, generator.render(reqs), generator.accelerator_settings)
        return reqs, core.finish(reqs, rows)

    return render_round


def test_rounds_until_the_quota_is_met_or_the_attempts_are_spent(tmp_path, tiny_base, generator):
    # Sharpness of the tiny model's 2-step renders lies around 1000: some pass, some do not.
    render_round = serve(tmp_path / "a", tiny_base, generator, 1000.0)
    quota = RequestQuota.of(2, 5, None)
    _, images, report = asyncio.run(quota.render(render_round, 40, 1))
    statuses = [im.status for im in images]
    assert [im.seed for im in images] == list(range(40, 40 + len(images)))  # attempt k: seed + k
    assert report["attempts"] == len(images) <= 5 and report["accepted"] == statuses.count("accepted")
    if report["met"]:
        assert statuses.count("accepted") == 2 and statuses[-1] == "accepted"
    else:
        assert len(images) == 5 and report["reasons"]
    # The same seed makes the same attempts.
    again = asyncio.run(quota.render(serve(tmp_path / "b", tiny_base, generator, 1000.0), 40, 1))
    assert [im.image_id for im in again[1]] == [im.image_id for im in images]


def test_a_row_that_never_passes_spends_its_attempts_and_says_why(tmp_path, tiny_base, generator):
    render_round = serve(tmp_path, tiny_base, generator, 1e9)
    _, images, report = asyncio.run(RequestQuota.of(2, 5, None).render(render_round, 7, 1))
    assert len(images) == 5 and report["rounds"] == 3  # 2, 2, then the 1 attempt left
    assert not report["met"] and report["reasons"] == {"blur": 5} and not report["stopped_on_budget"]


def test_a_cost_cap_stops_after_the_round_that_reached_it(tmp_path, tiny_base, generator):
    render_round = serve(tmp_path, tiny_base, generator, 1e9)
    _, images, report = asyncio.run(RequestQuota.of(2, 5, 1e-12).render(render_round, 7, 1))
    # The first round's cost is unknown until it is rendered; it crosses the cap, so no second starts.
    assert len(images) == 2 and report["rounds"] == 1 and report["stopped_on_budget"]
    assert report["spent_usd"] == pytest.approx(sum(im.cost_usd for im in images)) and report["spent_usd"] > 0
    with pytest.raises(ValueError, match="max_attempts"):
        RequestQuota.of(3, 2, None)
    assert RequestQuota.of(None, None, None) is None
