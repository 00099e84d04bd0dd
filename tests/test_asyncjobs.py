"""Asynchronous jobs without Serve or Ray: records, queue policy, spec preparation, progress from a
real catalog, signed webhooks to a loopback receiver, SSRF refusals and the Batch API's files."""

from __future__ import annotations

import json
import re
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from app.asyncjobs import batch, submit, webhooks
from app.asyncjobs.queue import LimitExceeded, QueuePolicy, RequestTooLarge, next_to_start, queue_order, queue_position
from app.asyncjobs.records import IdempotencyConflict, IllegalTransition, JobError, JobNotFound, JobRecord, JobStore
from app.catalog.schema import empty_row
from app.catalog.store import CatalogStore
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
SPEC = {"run_name": "async", "model": {"base": "tiny-sdxl"}, "size": "tiny-portrait", "steps": 2}


@pytest.fixture
def store(tmp_path):
    return JobStore(OutputStore.at(str(tmp_path / "out")))


# --- records ---------------------------------------------------------------------------------------


def test_idempotency_key_same_body_same_job_different_body_conflict(store):
    a, created = store.create("key-a", {"spec": SPEC, "rows": [{"prompt": "x"}]}, idempotency_key="k1")
    assert created
    again, created = store.create("key-a", {"rows": [{"prompt": "x"}], "spec": SPEC}, idempotency_key="k1")
    assert not created and again.id == a.id
    with pytest.raises(IdempotencyConflict, match="k1"):
        store.create("key-a", {"spec": SPEC, "rows": [{"prompt": "y"}]}, idempotency_key="k1")
    # The same key from another tenant is another tenant's key.
    other, created = store.create("key-b", {"spec": SPEC, "rows": [{"prompt": "y"}]}, idempotency_key="k1")
    assert created and other.id != a.id
    assert len(store.all()) == 2


def test_a_tenant_cannot_see_another_tenants_job(store):
    a, _ = store.create("key-a", {})
    assert store.get(a.id, "key-a").id == a.id
    with pytest.raises(JobNotFound):
        store.get(a.id, "key-b")
    assert store.list_jobs("key-b")[0] == []
    with pytest.raises(JobNotFound):
        store.get("../../etc", "key-a")


def test_state_moves_only_along_legal_transitions_and_each_is_an_event(store):
    job, _ = store.create("t", {})
    with pytest.raises(IllegalTransition, match="queued: it cannot become succeeded"):
        store.transition(job.id, "succeeded")
    store.transition(job.id, "running")
    store.transition(job.id, "cancelled")
    store.transition(job.id, "queued")  # resume
    store.transition(job.id, "running")
    done = store.transition(job.id, "succeeded")
    assert done.finished_at and done.started_at
    with pytest.raises(IllegalTransition, match="final"):
        store.transition(job.id, "queued")
    with pytest.raises(JobError, match="not one of"):
        store.transition(job.id, "paused")
    states = [e["state"] for e in store.events(job.id, "state")]
    assert states == ["running", "cancelled", "queued", "running", "succeeded"]
    assert store.events(job.id)[0]["type"] == "created"


def test_records_survive_a_new_store_object(store):
    job, _ = store.create("t", {}, priority=3)
    store.transition(job.id, "running", submissions=["s1"])
    reopened = JobStore(OutputStore.at(store.output.uri))
    rec = reopened.get(job.id, "t")
    assert (rec.state, rec.priority, rec.submissions) == ("running", 3, ["s1"])


def test_listing_filters_and_pages_newest_first(store):
    ids = [store.create("t", {"n": i})[0].id for i in range(5)]
    store.create("other", {})
    store.transition(ids[0], "cancelled")
    page, more = store.list_jobs("t", limit=2)
    assert [r.id for r in page] == ids[::-1][:2] and more
    page2, more = store.list_jobs("t", limit=2, after=page[-1].id)
    assert [r.id for r in page2] == ids[::-1][2:4] and more
    page3, more = store.list_jobs("t", limit=2, after=page2[-1].id)
    assert [r.id for r in page3] == [ids[0]] and not more
    assert [r.id for r in store.list_jobs("t", state="cancelled")[0]] == [ids[0]]
    with pytest.raises(JobError, match="state filter"):
        store.list_jobs("t", state="done")
    with pytest.raises(JobError, match="limit 0"):
        store.list_jobs("t", limit=0)


# --- queue -----------------------------------------------------------------------------------------


def test_queue_order_is_priority_then_submission_time(store):
    low, _ = store.create("t", {"a": 1}, priority=0)
    high, _ = store.create("t", {"a": 2}, priority=5)
    low2, _ = store.create("t", {"a": 3}, priority=0)
    started, _ = store.create("t", {"a": 4}, priority=9)
    store.transition(started.id, "running")
    jobs = store.all()
    assert [j.id for j in queue_order(jobs)] == [high.id, low.id, low2.id]
    assert queue_position(store.load(low2.id), jobs) == 3
    assert queue_position(store.load(started.id), jobs) is None
    assert next_to_start(jobs, QueuePolicy(max_running=1)) == []
    assert [j.id for j in next_to_start(jobs, QueuePolicy(max_running=2))] == [high.id]


def test_bulk_jobs_never_take_the_gpus_kept_for_serve():
    policy = QueuePolicy(cluster_gpus=4, serve_gpus=1)
    assert policy.bulk_overrides({"generators": None}) == {
        "compute.accelerator_resource": "gpu_bulk",
        "compute.generators": 3,
    }
    assert policy.bulk_overrides({"generators": 8})["compute.generators"] == 3
    assert policy.bulk_overrides({"generators": 2})["compute.generators"] == 2
    with pytest.raises(LimitExceeded, match="kept for Serve"):
        QueuePolicy(cluster_gpus=1, serve_gpus=1).bulk_overrides({})
    with pytest.raises(JobError, match="more than the cluster"):
        QueuePolicy(cluster_gpus=1, serve_gpus=2)
    assert QueuePolicy().bulk_overrides({}) == {}  # a CPU cluster
    assert QueuePolicy(cluster_gpus=4).bulk_overrides({"generators": 8}) == {}  # no GPU kept for Serve: no lane


def test_the_servers_config_sizes_the_lane_from_the_clusters_gpus_once_and_checks_it(caplog):
    from app.serve.config import JobsSettings
    from app.serve.jobrunner import queue_policy, sized_lane
    from app.spec import SpecError

    kept = JobsSettings(serve_gpus=1)
    sized = sized_lane(kept, cluster_gpus=4, declared=3, serve_gpu_replicas=1)
    assert sized.cluster_gpus == 4 and not caplog.records
    assert queue_policy(sized).bulk_overrides({"generators": 8}) == {
        "compute.accelerator_resource": "gpu_bulk",
        "compute.generators": 3,
    }
    # Named in the config (an autoscaling cluster whose GPU nodes are not up yet): not counted.
    named = JobsSettings(serve_gpus=1, cluster_gpus=8, bulk_resource="gpu_batch")
    assert queue_policy(sized_lane(named, 0, 7, 1)).bulk_overrides({}) == {
        "compute.accelerator_resource": "gpu_batch",
        "compute.generators": 7,
    }
    with pytest.raises(SpecError, match="jobs.serve_gpus: serve_gpus 5 is more than the cluster's 4 GPUs"):
        sized_lane(JobsSettings(serve_gpus=5), 4, 0, 1)
    with pytest.raises(SpecError, match="Serve's generators may use 2 GPU.* but 1 are kept"):
        sized_lane(kept, 4, 3, serve_gpu_replicas=2)
    # A cluster that declares another amount of the lane's resource than it has GPUs for: said at start.
    sized_lane(kept, 4, declared=4, serve_gpu_replicas=1)
    assert "declare gpu_bulk: 3" in caplog.text
    # No GPU kept, or none in the cluster: nothing to check, the specs run as written.
    assert not queue_policy(sized_lane(JobsSettings(), 4, 0, 4)).lane
    assert not queue_policy(sized_lane(kept, 0, 0, 0)).lane


def test_limits_name_themselves(store):
    policy = QueuePolicy(max_in_flight_per_key=2, max_rows_per_job=3, max_upload_bytes=10)
    for i in range(2):
        store.create("t", {"i": i})
    with pytest.raises(LimitExceeded, match="max_in_flight_per_key=2") as e:
        policy.check_in_flight("t", store.all())
    assert e.value.status == 429
    policy.check_in_flight("other", store.all())
    with pytest.raises(RequestTooLarge, match="max_rows_per_job=3"):
        policy.check_rows(4)
    with pytest.raises(RequestTooLarge, match="max_upload_bytes=10"):
        policy.check_upload(11)


# --- submission --------------------------------------------------------------------------------------


def test_submission_body_errors_name_the_field():
    with pytest.raises(JobError, match="exactly one of"):
        submit.parse_submission({"rows": [{"prompt": "x"}]})
    with pytest.raises(JobError, match="spec_yaml: not valid YAML"):
        submit.parse_submission({"spec_yaml": "a: [1"})
    with pytest.raises(JobError, match=r"rows\[1\]"):
        submit.parse_submission({"spec": SPEC, "rows": [{"prompt": "x"}, 3]})
    with pytest.raises(JobError, match="priority"):
        submit.parse_submission({"spec": SPEC, "priority": "high"})
    with pytest.raises(JobError, match="unknown field"):
        submit.parse_submission({"spec": SPEC, "colour": 1})
    spec, rows = submit.parse_submission({"spec_yaml": yaml.safe_dump(SPEC), "rows": [{"prompt": "x"}]})
    assert spec == SPEC and rows == [{"prompt": "x"}]


def test_prepare_writes_the_spec_and_rows_and_validates_like_the_cli(store):
    job, _ = store.create("t", {})
    policy = QueuePolicy(cluster_gpus=2, serve_gpus=1)
    spec = submit.prepare(store, job, SPEC, [{"prompt": "a", "sku": 1}, {"prompt": "b"}], policy)
    rec = store.load(job.id)
    assert rec.rows == 2 and rec.expected_images == 2
    assert spec.output.uri == store.output.uri and spec.compute.accelerator_resource == "gpu_bulk"
    written = yaml.safe_load(Path(store.output.path(store.output.rel_of(rec.spec_uri))).read_text())
    assert written["input"]["path"].endswith(f"jobs/{job.id}/rows.parquet")
    rows = pq.read_table(written["input"]["path"]).to_pylist()
    assert rows == [{"prompt": "a", "sku": "1"}, {"prompt": "b", "sku": None}]
    bad, _ = store.create("t", {"x": 1})
    with pytest.raises(JobError, match="steps"):
        submit.prepare(store, bad, {**SPEC, "steps": 0}, [{"prompt": "a"}], policy)
    with pytest.raises(RequestTooLarge):
        submit.prepare(store, bad, SPEC, [{"prompt": "a"}] * 3, QueuePolicy(max_rows_per_job=2))


def test_a_job_body_asks_for_accepted_images_per_row_and_a_cost_cap(store):
    body = {"spec": {**SPEC, "variations": {"seeds_per_row": 2}}, "accepted_per_row": 3, "max_cost_usd": 1.5}
    spec_data, rows = submit.parse_submission({**body, "rows": [{"prompt": "a"}, {"prompt": "b"}]})
    assert spec_data["variations"] == {"accepted_per_row": 3} and spec_data["budget"] == {"max_cost_usd": 1.5}
    job, _ = store.create("t", {})
    spec = submit.prepare(store, job, spec_data, rows, QueuePolicy(cluster_gpus=2, serve_gpus=1))
    assert spec.variations.attempts_per_row == 9 and spec.budget.max_cost_usd == 1.5
    assert store.load(job.id).expected_images == 2 * 3  # what was asked for: accepted images
    bad, _ = store.create("t", {"y": 1})
    with pytest.raises(JobError, match="max_attempts_per_row .* is below accepted_per_row"):
        body = {"spec": SPEC, "accepted_per_row": 3, "max_attempts_per_row": 2}
        submit.prepare(store, bad, submit.parse_submission(body)[0], [{"prompt": "a"}], QueuePolicy())
    with pytest.raises(JobError, match="max_cost_usd"):
        submit.prepare(
            store, bad, submit.parse_submission({"spec": SPEC, "max_cost_usd": -1})[0], [{"prompt": "a"}], QueuePolicy()
        )


def test_entrypoint_is_the_ray_job_submit_command_with_a_fixed_run_id():
    cmd = submit.entrypoint("/data/jobs/job_1/spec.yaml", "abc")
    assert cmd == "python -m jobs.generate /data/jobs/job_1/spec.yaml --run-id abc --quiet --no-mlflow"


def test_runner_waits_for_a_jobs_spec_and_records_a_start_failure_once_not_every_tick(store):
    from ports import free_port

    from app.asyncjobs.runner import JobRunner

    unwritten, _ = store.create("t", {"n": 0})  # its spec is still being written
    job, _ = store.create("t", {"n": 1})
    submit.prepare(store, job, SPEC, [{"prompt": "a"}], QueuePolicy())
    nobody = submit.RayJobs(f"http://127.0.0.1:{free_port()}")  # no dashboard answers there
    runner = JobRunner(store, nobody, QueuePolicy(max_running=1))
    for _ in range(3):
        runner.tick()
    assert [ev["type"] for ev in store.events(job.id)] == ["created", "start_failed"]
    assert store.load(job.id).state == "queued" and runner.ticks == 3
    assert [ev["type"] for ev in store.events(unwritten.id)] == ["created"]

    # The loop outlives a tick that fails (the store unreadable a moment) and stops when told.
    stop = threading.Event()
    calls = []

    def failing_tick():
        calls.append(1)
        if len(calls) == 3:
            stop.set()
        raise OSError("the store is away")

    runner.tick = failing_tick  # type: ignore[method-assign]
    runner.run_forever(stop, every_s=0.01)
    assert len(calls) == 3 and runner.last_error == "OSError: the store is away"


def test_jobs_go_to_the_named_dashboard_or_the_clusters_own_never_a_guessed_one(monkeypatch):
    from app.serve.config import JobsSettings
    from app.serve.jobrunner import dashboard_address

    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    assert dashboard_address(JobsSettings()) == ""  # no Ray here: nothing is guessed
    with pytest.raises(JobError, match="no Ray dashboard"):
        submit.RayJobs("").logs(JobRecord(id="job_x", tenant="t", submissions=["imagefab-job_x-1"]))
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://head:8265")
    assert dashboard_address(JobsSettings()) == "http://head:8265"
    assert dashboard_address(JobsSettings(ray_dashboard="http://other:8265")) == "http://other:8265"


def test_readme_jobs_config_is_the_servers_default():
    from app.serve.config import JobsSettings, load_serve_config

    text = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(jobs:\n.*?)```", text, re.S).group(1)
    assert JobsSettings.model_validate(yaml.safe_load(block)["jobs"]) == JobsSettings()
    deployed = load_serve_config(REPO / "deploy" / "imagefab-serve.yaml").jobs
    assert deployed.runner and not deployed.allow_private_webhooks


def _catalogue(store, run_id, statuses, *, keys=None):
    rows = []
    for i, s in enumerate(statuses):
        r = empty_row()
        r.update(
            image_id=f"{run_id}-{i}",
            status=s,
            gpu_seconds=0.5,
            cpu_seconds=0.25,
            cost_usd=0.001,
            created_at=datetime.now(UTC),
            row_key=(keys or [f"r{i}" for i in range(len(statuses))])[i],
            uri="" if s == "failed" else store.output.uri_of(f"images/{run_id}-{i}.png"),
            error="oom" if s == "failed" else None,
        )
        rows.append(r)
    CatalogStore(store.output).append(rows, run_id=run_id, date="2026-01-01")


def test_progress_and_images_come_from_the_jobs_catalog_rows(store):
    job, _ = store.create("t", {})
    job.expected_images = 10
    store.update(job)
    store.transition(job.id, "running")
    rec = store.load(job.id)
    _catalogue(store, rec.run_id, ["accepted", "accepted", "review", "failed"])
    _catalogue(store, "someone-else", ["accepted"])
    p = submit.progress(store, rec, now=rec.started_at + 2)
    assert p["images_done"] == 4 and p["counts"] == {"accepted": 2, "review": 1, "rejected": 0, "failed": 1}
    assert p["images_per_second"] == 2.0 and p["eta_seconds"] == 3.0
    assert p["gpu_seconds"] == 2.0 and p["cost_usd"] == pytest.approx(0.004)
    page, total = submit.images(store, rec, limit=3)
    assert total == 4 and len(page) == 3
    page2, _ = submit.images(store, rec, limit=3, offset=3)
    assert {r["image_id"] for r in page + page2} == {f"{rec.run_id}-{i}" for i in range(4)}


def test_progress_reads_through_the_compactions_of_a_running_job(store):
    """A run compacts its partition at its end (and again after a resume), deleting the files it
    merged while the server may be reading them: progress lists again, never answering with an
    error or with fewer images than before."""
    from app.catalog.compact import compact

    job, _ = store.create("t", {})
    store.transition(job.id, "running")
    rec = store.load(job.id)
    done = threading.Event()

    def run():
        n = 0
        try:
            for _ in range(6):
                for _ in range(6):
                    rows = []
                    for _ in range(2):
                        r = empty_row()
                        r.update(image_id=f"{rec.run_id}-{n}", status="accepted", created_at=datetime.now(UTC))
                        rows.append(r)
                        n += 1
                    CatalogStore(store.output).append(rows, run_id=rec.run_id, date="2026-01-01")
                compact(store.output, partitions=[("2026-01-01", rec.run_id)])
        finally:
            done.set()

    writer = threading.Thread(target=run)
    writer.start()
    seen = [0]
    while not done.is_set():
        seen.append(submit.progress(store, rec)["images_done"])
        assert seen[-1] >= seen[-2]
    writer.join()
    assert submit.progress(store, rec)["images_done"] == 72 and len(seen) > 10


# --- webhooks ----------------------------------------------------------------------------------------


def readme_verify():
    """The verification snippet from the README, run as a receiver would."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"<!-- webhook-verify -->\s*```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    return scope["verify"]


class Receiver:
    """A loopback HTTP server that answers each POST with the next status of `statuses`."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.got: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_webhook_is_signed_retried_with_backoff_and_every_attempt_recorded(store, receiver):
    rx = receiver([500, 503])
    hook = webhooks.check_webhook_request({"url": rx.url, "events": ["succeeded"]}, allow_private=True)
    assert hook["secret"].startswith("whsec_")
    job, _ = store.create("t", {}, webhook=hook)
    sleeps: list[float] = []
    d = webhooks.WebhookDispatcher(store, allow_private=True, backoff_s=0.5, sleep=sleeps.append)
    assert not d.deliver(job.id, "started", {})  # not asked for
    assert d.deliver(job.id, "succeeded", {"state": "succeeded"})
    assert sleeps == [0.5, 1.0]
    assert len(rx.got) == 3
    headers, body = rx.got[-1]
    assert readme_verify()(hook["secret"], headers, body)
    assert not readme_verify()(webhooks.new_secret(), headers, body)
    assert webhooks.verify(hook["secret"], headers, body)
    assert json.loads(body)["type"] == "job.succeeded" and json.loads(body)["data"]["id"] == job.id
    assert len({h["webhook-id"] for h, _ in rx.got}) == 1  # retries keep the message id
    attempts = store.events(job.id, "webhook_attempt")
    assert [a["status_code"] for a in attempts] == [500, 503, 200]
    assert store.events(job.id, "webhook_delivered")[0]["attempts"] == 3
    assert "secret" not in json.dumps(store.load(job.id).public())


def test_runner_hands_webhooks_to_its_delivery_worker_in_order_without_waiting_for_retries(store, receiver):
    from concurrent.futures import ThreadPoolExecutor

    from app.asyncjobs.runner import JobRunner

    rx = receiver([500, 500])  # the first event needs two retries
    hook = webhooks.check_webhook_request({"url": rx.url, "events": ["started", "succeeded"]}, allow_private=True)
    job, _ = store.create("t", {}, webhook=hook)
    retried = threading.Event()
    d = webhooks.WebhookDispatcher(store, allow_private=True, sleep=lambda s: retried.wait(5))
    with ThreadPoolExecutor(max_workers=1) as pool:
        runner = JobRunner(store, submit.RayJobs(""), QueuePolicy(), d, pool)
        runner.notify(store.load(job.id), "started", {"state": "running"})
        runner.notify(store.load(job.id), "succeeded", {"state": "succeeded"})
        assert len(rx.got) <= 1  # the runner went on while the receiver was failing
        retried.set()
    assert [json.loads(body)["type"] for _, body in rx.got] == ["job.started"] * 3 + ["job.succeeded"]
    assert [e["event"] for e in store.events(job.id, "webhook_delivered")] == ["started", "succeeded"]


def test_state_changes_wait_in_the_outbox_until_a_runner_delivers_them_once_with_a_stable_id(store, receiver):
    from app.asyncjobs.runner import JobRunner

    rx = receiver([])
    events = ["started", "succeeded", "cancelled"]
    hook = webhooks.check_webhook_request({"url": rx.url, "events": events}, allow_private=True)
    job, _ = store.create("t", {}, webhook=hook)
    quiet, _ = store.create("t", {"n": 2})  # no webhook: nothing owed
    # A runner dies after starting the job and again after its end, before any webhook went out.
    store.transition(job.id, "running", submissions=["sub-1"])
    store.transition(quiet.id, "running", submissions=["sub-q"])
    store.transition(job.id, "succeeded")
    box = store.load(job.id).outbox
    assert [(e["key"], e["event"], e.get("submission_id")) for e in box] == [
        ("1-started", "started", "sub-1"),
        ("2-succeeded", "succeeded", None),
    ]
    assert store.load(quiet.id).outbox == [] and "outbox" not in store.load(job.id).public()

    def runner() -> JobRunner:  # a fresh process: it knows only what the store says
        return JobRunner(
            store, submit.RayJobs(""), QueuePolicy(), webhooks.WebhookDispatcher(store, allow_private=True)
        )

    runner().flush_outbox()
    got = [(json.loads(b)["type"], h["webhook-id"]) for h, b in rx.got]
    assert got == [
        ("job.started", webhooks.message_id(job.id, "1-started")),
        ("job.succeeded", webhooks.message_id(job.id, "2-succeeded")),
    ]
    assert json.loads(rx.got[0][1])["data"]["submission_id"] == "sub-1"
    assert json.loads(rx.got[1][1])["data"]["progress"]["images_done"] == 0
    assert all(readme_verify()(hook["secret"], h, b) for h, b in rx.got)

    again = runner()
    again.flush_outbox()
    assert len(rx.got) == 2  # settled entries are not sent again by the next runner

    # A change made by someone else (a cancel through the ingress) reaches the receiver too.
    other, _ = store.create("t", {"n": 3}, webhook=hook)
    store.transition(other.id, "cancelled")
    again.flush_outbox()
    assert json.loads(rx.got[-1][1])["type"] == "job.cancelled" and len(rx.got) == 3
    # Entries older than the outbox's window are left alone.
    late, _ = store.create("t", {"n": 4}, webhook=hook)
    store.transition(late.id, "cancelled")
    runner().flush_outbox(now=store.load(late.id).outbox[0]["at"] + 2 * 24 * 3600)
    assert len(rx.got) == 3


def test_webhook_gives_up_on_a_client_error_and_records_it(store, receiver):
    rx = receiver([410])
    hook = webhooks.check_webhook_request({"url": rx.url, "events": ["failed"]}, allow_private=True)
    job, _ = store.create("t", {}, webhook=hook)
    d = webhooks.WebhookDispatcher(store, allow_private=True, sleep=lambda s: None)
    assert not d.deliver(job.id, "failed", {})
    assert len(rx.got) == 1 and store.events(job.id, "webhook_failed")[0]["final"]


@pytest.mark.parametrize(
    "address,why",
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("100.64.0.1", "not globally routable"),
    ],
)
def test_ssrf_refuses_non_public_addresses(address, why):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(webhooks.WebhookTargetRefused, match=why):
        webhooks.check_target(f"http://{host}:8080/x", allow_private=False)
    # A name that resolves there is refused the same way.
    with pytest.raises(webhooks.WebhookTargetRefused, match=why):
        webhooks.check_target("https://hooks.example.com/x", allow_private=False, resolve=lambda h, p: [address])


def test_ssrf_checks_every_resolved_address_and_the_url_itself():
    with pytest.raises(webhooks.WebhookTargetRefused, match="10.0.0.7"):
        webhooks.check_target(
            "https://h.example/x", allow_private=False, resolve=lambda h, p: ["93.184.216.34", "10.0.0.7"]
        )
    t = webhooks.check_target("https://h.example/x?a=1", allow_private=False, resolve=lambda h, p: ["93.184.216.34"])
    assert (t.address, t.port, t.path) == ("93.184.216.34", 443, "/x?a=1")
    for url, why in [
        ("ftp://a.example/", "scheme"),
        ("http://u:p@a.example/", "credentials"),
        ("http:///x", "no host"),
    ]:
        with pytest.raises(webhooks.WebhookTargetRefused, match=why):
            webhooks.check_target(url, allow_private=False, resolve=lambda h, p: ["93.184.216.34"])
    with pytest.raises(webhooks.WebhookTargetRefused, match="localhost resolves to"):
        webhooks.check_target("http://localhost:9/x", allow_private=False)


_connects: list | None = None


def _audit(event, args):
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


sys.addaudithook(_audit)


def test_a_refused_webhook_opens_no_socket_to_the_target(store, receiver, monkeypatch):
    global _connects
    rx = receiver()
    monkeypatch.delenv(webhooks.ALLOW_PRIVATE_ENV, raising=False)
    with pytest.raises(webhooks.WebhookTargetRefused, match="IMAGEFAB_WEBHOOK_ALLOW_PRIVATE=1"):
        webhooks.check_webhook_request({"url": rx.url}, allow_private=webhooks.allow_private_from_env())
    # A job recorded while private targets were allowed, delivered after they no longer are.
    hook = webhooks.check_webhook_request({"url": rx.url, "events": ["succeeded"]}, allow_private=True)
    job, _ = store.create("t", {}, webhook=hook)
    _connects = []
    try:
        assert not webhooks.WebhookDispatcher(store, allow_private=False).deliver(job.id, "succeeded", {})
        seen = list(_connects)
    finally:
        _connects = None
    assert seen == [] and rx.got == []
    assert "loopback" in store.events(job.id, "webhook_failed")[0]["error"]
    monkeypatch.setenv(webhooks.ALLOW_PRIVATE_ENV, "1")
    assert webhooks.allow_private_from_env()


# --- Batch API ---------------------------------------------------------------------------------------


def _line(cid, prompt="a red boot", **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": batch.ENDPOINT, "body": {"prompt": prompt, **body}})


def test_batch_file_lines_are_validated_naming_the_line(store):
    files = batch.FileStore(store)
    good = "\n".join([_line("a", n=2, size="64x96"), _line("b", n=2, size="64x96")]).encode()
    f = files.create("t", good, purpose="batch", filename="in.jsonl")
    assert files.content(f.id, "t") == good and f.public()["bytes"] == len(good)
    with pytest.raises(JobNotFound):
        files.content(f.id, "other")
    cases = [
        (_line("a") + "\n" + _line("a"), "line 2: custom_id 'a' is used twice"),
        ("{oops", "line 1: not JSON"),
        (json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": {}}), "line 1: url"),
        (_line("a", prompt=""), "line 1: body.prompt"),
        (_line("a", n=11), "line 1: body.n 11"),
        (_line("a", size="big"), "line 1: size 'big'"),
        (_line("a", seed=3), "line 1: body has unknown field"),
        (_line("a", size="64x64") + "\n" + _line("b", size="96x96"), "body.size differs"),
        ("", "no request lines"),
    ]
    for text, msg in cases:
        with pytest.raises(batch.BatchLineError, match=re.escape(msg)):
            files.create("t", text.encode(), purpose="batch", filename="x.jsonl")
    with pytest.raises(JobError, match="purpose 'fine-tune'"):
        files.create("t", good, purpose="fine-tune", filename="x.jsonl")


def test_a_batch_becomes_a_spec_and_rows_keyed_by_custom_id(store):
    reqs = batch.parse_lines(
        "\n".join([_line("a", n=2, size="64x96"), _line("b", "a tote", n=2, size="64x96")]).encode()
    )
    spec, rows = batch.batch_spec(SPEC, reqs)
    assert spec["size"] == {"width": 64, "height": 96} and spec["variations"]["seeds_per_row"] == 2
    assert spec["input"]["key_column"] == "custom_id"
    assert rows == [{"custom_id": "a", "prompt": "a red boot"}, {"custom_id": "b", "prompt": "a tote"}]
    job, _ = store.create("t", {}, kind="batch")
    submit.prepare(store, job, spec, rows, QueuePolicy())
    assert store.load(job.id).expected_images == 4


def test_batch_output_and_error_lines_follow_openais_format(store):
    job, _ = store.create("t", {}, kind="batch")
    job.metadata = {"input_file_id": "file-1"}
    job.rows = 3
    store.update(job)
    rec = store.load(job.id)
    _catalogue(store, rec.run_id, ["accepted", "review", "failed"], keys=["a", "a", "b"])
    out, err, counts = batch.results(store, rec, ["a", "b", "c"], url_of=lambda r: "https://img/" + r["image_id"])
    assert counts == {"total": 3, "completed": 1, "failed": 2}
    assert set(out[0]) == {"id", "custom_id", "response", "error"}
    assert out[0]["custom_id"] == "a" and out[0]["response"]["status_code"] == 200
    assert len(out[0]["response"]["body"]["data"]) == 2 and out[0]["error"] is None
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("b", "image_failed"), ("c", "not_rendered")]
    assert err[0]["error"]["message"] == "oom" and err[0]["response"] is None
    obj = batch.batch_object(rec, counts)
    assert obj["status"] == "validating" and obj["object"] == "batch" and obj["request_counts"] == counts
    lines = batch.jsonl(out).decode().splitlines()
    assert json.loads(lines[0]) == out[0]
