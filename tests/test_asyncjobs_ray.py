"""A job through Ray's job submission API on a head the test starts: submitted, cancelled while it
runs, resumed to completion with every image exactly once, and a signed webhook when it is done."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from test_asyncjobs import Receiver, readme_verify
from test_job_submit import ray_head  # noqa: F401  (the fixture)

from app.asyncjobs import submit, webhooks
from app.asyncjobs.queue import QueuePolicy
from app.asyncjobs.records import TERMINAL, JobStore
from app.asyncjobs.runner import JobRunner
from app.asyncjobs.webhooks import WebhookDispatcher
from app.catalog.store import CatalogStore
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

SPEC = {
    "run_name": "async-ray",
    "model": {"base": "tiny-sdxl"},
    "size": "tiny-portrait",
    "steps": 2,
    "variations": {"seeds_per_row": 2, "base_seed": 7},
    "input": {"key_column": "sku"},
    "compute": {"device": "cpu", "batch_size": 1},
}


def wait_for(fn, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def test_job_is_cancelled_resumed_and_finishes_with_each_image_once(ray_head, model_catalog, tmp_path):  # noqa: F811
    address, _ = ray_head
    store = JobStore(OutputStore.at(str(tmp_path / "out")))
    rx = Receiver([])
    try:
        hook = webhooks.check_webhook_request({"url": rx.url, "events": ["started", "succeeded"]}, allow_private=True)
        rec, _ = store.create("key-a", {"n": 1}, webhook=hook)
        rows = [{"sku": f"P{i}", "prompt": f"studio photo of item {i}"} for i in range(4)]
        submit.prepare(store, rec, SPEC, rows, QueuePolicy())
        jobs = submit.RayJobs(address, runtime_env={"working_dir": str(REPO)}, python=sys.executable)

        # The dashboard answers before the head's job agent is ready: retry the first start.
        def started():
            try:
                return jobs.start(store, store.load(rec.id))
            except Exception as e:
                # Not ready yet: no job agent, or the dashboard dropping connections while it starts.
                if "No available agent" in str(e) or isinstance(e, (ConnectionError, OSError)):
                    return None
                raise

        wait_for(started, 300, "the job agent")

        def first_image():
            r = jobs.sync(store, store.load(rec.id))
            return r.state != "running" or submit.progress(store, r)["images_done"] > 0

        wait_for(first_image, 300, "a first image")
        assert store.load(rec.id).state == "running", jobs.logs(store.load(rec.id))[-3000:]
        cancelled = jobs.stop(store, store.load(rec.id))
        assert cancelled.state == "cancelled"
        kept = submit.progress(store, cancelled)["images_done"]
        assert kept > 0

        # Resume: queued again; the runner starts it (the same command again) and follows it.
        store.transition(rec.id, "queued")
        runner = JobRunner(store, jobs, QueuePolicy(), WebhookDispatcher(store, allow_private=True))

        def finished():
            runner.tick()
            r = store.load(rec.id)
            return r if r.state in TERMINAL else None

        final = wait_for(finished, 600, "the resumed job")
        assert final.state == "succeeded", jobs.logs(final)[-3000:]
        ids = CatalogStore(store.output).read(["image_id", "run_id"]).to_pylist()
        mine = [r["image_id"] for r in ids if r["run_id"] == final.run_id]
        assert len(mine) == len(set(mine)) == 8
        p = submit.progress(store, final)
        assert p["images_done"] == 8 and p["images_total"] == 8 and p["cpu_seconds"] > 0
        assert len(final.submissions) == 2

        # The runner delivered what the job's outbox owed, in order, each signed: both starts
        # (the first made before any runner existed) and the end.
        kinds = [json.loads(body)["type"] for _, body in rx.got]
        assert kinds == ["job.started", "job.started", "job.succeeded"]
        assert [json.loads(b)["data"]["submission_id"] for _, b in rx.got[:2]] == final.submissions
        for headers, body in rx.got:
            assert readme_verify()(hook["secret"], headers, body)
        assert json.loads(rx.got[-1][1])["data"]["progress"]["images_done"] == 8
        assert len(store.events(rec.id, "webhook_delivered")) == 3
    finally:
        rx.close()
