"""The jobs and Batch API routes on a plain FastAPI app (no Serve, no Ray): HTTP statuses, the
Idempotency-Key, tenant isolation, limits, and the official `openai` client's files and batches."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import NotFoundError, OpenAI
from test_asyncjobs import SPEC, _catalogue, _line

from app.asyncjobs.http import JobsService, jobs_service, router
from app.asyncjobs.queue import QueuePolicy
from app.asyncjobs.records import JobStore
from app.storage import OutputStore

KEY_A, KEY_B = "a" * 20, "b" * 20


@pytest.fixture
def svc(tmp_path):
    return JobsService(
        JobStore(OutputStore.at(str(tmp_path / "out"))),
        QueuePolicy(max_in_flight_per_key=3, max_rows_per_job=5, max_upload_bytes=4000),
        keys=(KEY_A, KEY_B),
        batch_spec=SPEC,
        image_url=lambda row: f"https://img.example/{row['image_id']}",
    )


@pytest.fixture
def client(svc):
    app = FastAPI()
    app.include_router(router)
    app.dependency_overrides[jobs_service] = lambda: svc
    return TestClient(app)


def auth(key):
    return {"authorization": f"Bearer {key}"}


def test_submit_answers_202_and_the_idempotency_key_returns_the_same_job(client):
    body = {"spec": SPEC, "rows": [{"prompt": "a boot"}, {"prompt": "a tote"}], "priority": 2}
    r = client.post("/v1/jobs", json=body, headers={**auth(KEY_A), "idempotency-key": "k"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["queue_position"] == 1 and job["progress"]["images_total"] == 2
    assert "webhook_secret" not in job and "tenant" not in job
    again = client.post("/v1/jobs", json=body, headers={**auth(KEY_A), "idempotency-key": "k"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    other = client.post("/v1/jobs", json={**body, "priority": 3}, headers={**auth(KEY_A), "idempotency-key": "k"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]["message"]


def test_errors_name_the_field_and_limits_name_themselves(client):
    r = client.post("/v1/jobs", json={"spec": {**SPEC, "steps": 0}, "rows": [{"prompt": "x"}]}, headers=auth(KEY_A))
    assert r.status_code == 400 and "steps" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": "x"}] * 6}, headers=auth(KEY_A))
    assert r.status_code == 413 and "max_rows_per_job=5" in r.json()["error"]["message"]
    assert client.post("/v1/jobs", json={"spec": SPEC}, headers={"authorization": "Bearer nope"}).status_code == 401
    hook = {"url": "http://127.0.0.1:9/hook"}
    r = client.post("/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": "x"}], "webhook": hook}, headers=auth(KEY_A))
    assert r.status_code == 400 and "IMAGEFAB_WEBHOOK_ALLOW_PRIVATE" in r.json()["error"]["message"]
    for i in range(2):  # the spec error left a failed job: in flight are queued and running only
        assert client.post(
            "/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": f"{i}"}]}, headers=auth(KEY_A)
        ).is_success
    client.post("/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": "2"}]}, headers=auth(KEY_A))
    r = client.post("/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": "3"}]}, headers=auth(KEY_A))
    assert r.status_code == 429 and "max_in_flight_per_key=3" in r.json()["error"]["message"]


def test_a_cluster_whose_gpus_are_all_kept_for_serve_refuses_bulk_jobs(tmp_path):
    from app.serve.config import JobsSettings
    from app.serve.jobrunner import queue_policy, sized_lane

    settings = sized_lane(JobsSettings(serve_gpus=2), cluster_gpus=2, declared=0, serve_gpu_replicas=2)
    svc = JobsService(JobStore(OutputStore.at(str(tmp_path / "out"))), queue_policy(settings))
    app = FastAPI()
    app.include_router(router)
    app.dependency_overrides[jobs_service] = lambda: svc
    client = TestClient(app)
    r = client.post("/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": "a boot"}]})
    assert r.status_code == 429, r.text
    assert "all kept for Serve (serve_gpus=2)" in r.json()["error"]["message"]
    assert svc.store.all() == []  # refused before anything was recorded
    # A job recorded before (when the cluster had GPUs to spare) is not resumed into no lane.
    rec, _ = svc.store.create("anyone", {"n": 1})
    svc.store.transition(rec.id, "cancelled")
    r = client.post(f"/v1/jobs/{rec.id}/resume")
    assert r.status_code == 429 and "serve_gpus=2" in r.text


def test_webhook_secret_is_returned_once(client, svc):
    svc.allow_private_webhooks = True
    body = {
        "spec": SPEC,
        "rows": [{"prompt": "x"}],
        "webhook": {"url": "http://127.0.0.1:9/h", "events": ["succeeded"]},
    }
    job = client.post("/v1/jobs", json=body, headers=auth(KEY_A)).json()
    assert job["webhook_secret"].startswith("whsec_") and job["webhook"] == {
        "url": "http://127.0.0.1:9/h",
        "events": ["succeeded"],
    }
    assert "webhook_secret" not in client.get(f"/v1/jobs/{job['id']}", headers=auth(KEY_A)).json()


def test_key_b_cannot_list_read_cancel_resume_or_page_key_as_job(client, svc):
    job = client.post("/v1/jobs", json={"spec": SPEC, "rows": [{"prompt": "x"}]}, headers=auth(KEY_A)).json()
    rec = svc.store.load(job["id"])
    _catalogue(svc.store, rec.run_id, ["accepted"])
    assert client.get("/v1/jobs", headers=auth(KEY_B)).json()["data"] == []
    for method, path in [
        ("get", f"/v1/jobs/{job['id']}"),
        ("get", f"/v1/jobs/{job['id']}/images"),
        ("post", f"/v1/jobs/{job['id']}/cancel"),
        ("post", f"/v1/jobs/{job['id']}/resume"),
    ]:
        assert getattr(client, method)(path, headers=auth(KEY_B)).status_code == 404, path
    listed = client.get("/v1/jobs?state=queued", headers=auth(KEY_A)).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    images = client.get(f"/v1/jobs/{job['id']}/images?limit=10", headers=auth(KEY_A)).json()
    assert images["total"] == 1 and images["data"][0]["url"].startswith("https://img.example/")
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(KEY_A))
    assert r.json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/resume", headers=auth(KEY_A)).json()["state"] == "queued"


def test_openai_client_uploads_a_batch_file_creates_cancels_and_reads_the_results(client, svc):
    a = OpenAI(base_url="http://testserver/v1", api_key=KEY_A, http_client=client, max_retries=0)
    b = OpenAI(base_url="http://testserver/v1", api_key=KEY_B, http_client=client, max_retries=0)
    lines = "\n".join([_line("boot", n=1, size="64x96"), _line("tote", "a tote", n=1, size="64x96")]) + "\n"
    f = a.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(lines)
    assert a.files.content(f.id).content == lines.encode()
    with pytest.raises(NotFoundError):
        b.files.content(f.id)
    bt = a.batches.create(input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h")
    assert bt.status == "validating" and bt.request_counts.total == 2
    with pytest.raises(NotFoundError):
        b.batches.retrieve(bt.id)
    # The rendering itself is the bulk job's (tests/test_asyncjobs_ray.py); here its catalog rows
    # stand in for one rendered request, and the batch is cancelled before the other.
    rec = svc.store.load(bt.id)
    _catalogue(svc.store, rec.run_id, ["accepted"], keys=["boot"])
    done = a.batches.cancel(bt.id)
    assert done.status == "cancelled" and done.request_counts.completed == 1 and done.request_counts.failed == 1
    assert a.batches.retrieve(bt.id).output_file_id == done.output_file_id
    out = [json.loads(x) for x in a.files.content(done.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in a.files.content(done.error_file_id).text.splitlines()]
    assert out[0]["custom_id"] == "boot" and out[0]["response"]["status_code"] == 200
    assert out[0]["response"]["body"]["data"][0]["url"].startswith("https://img.example/")
    assert err[0]["custom_id"] == "tote" and err[0]["error"]["code"] == "not_rendered"
    with pytest.raises(NotFoundError):
        b.files.content(done.output_file_id)
    big = ("\n".join(_line(f"r{i}") for i in range(200))).encode()
    r = client.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "batch"}, headers=auth(KEY_A))
    assert r.status_code == 413 and "max_upload_bytes=4000" in r.json()["error"]["message"]


def test_cli_submits_lists_shows_cancels_resumes_and_watches(client, svc, tmp_path):
    import io

    import yaml

    from app.cli import build_parser
    from app.jobs_cli import run_jobs_command

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "a boot"}, {"prompt": "a tote"}]))
    client.headers["authorization"] = f"Bearer {KEY_A}"

    def run(*argv):
        out = io.StringIO()
        rc = run_jobs_command(build_parser().parse_args(["jobs", *argv]), client, out, sleep=lambda s: None)
        return rc, out.getvalue()

    rc, text = run("submit", str(spec), "--rows", str(rows), "--priority", "4")
    job = json.loads(text)
    assert rc == 0 and job["state"] == "queued" and job["priority"] == 4
    assert f"{job['id']}  queued (position 1)  prio 4  0 images" in run("list")[1]
    assert json.loads(run("show", job["id"])[1])["id"] == job["id"]
    rec = svc.store.load(job["id"])
    _catalogue(svc.store, rec.run_id, ["accepted"])
    assert run("cancel", job["id"]) == (0, f"{job['id']}  cancelled\n")
    rc, text = run("watch", job["id"])
    assert rc == 1 and text.startswith("cancelled [############............] 1/2")
    assert run("resume", job["id"])[1] == f"{job['id']}  queued\n"


def test_concurrent_posts_with_one_idempotency_key_make_one_job_across_replicas(svc):
    """Ingress replicas (each its own app and service over the one output store) answer the same
    key at the same moment: one job, one 202, the others the same job; another body is a 409."""
    replicas = []
    for _ in range(4):
        app = FastAPI()
        app.include_router(router)
        other = JobsService(svc.store, QueuePolicy(max_in_flight_per_key=100), keys=svc.keys)
        app.dependency_overrides[jobs_service] = lambda other=other: other
        replicas.append(TestClient(app))
    body = {"spec": SPEC, "rows": [{"prompt": "a boot"}]}
    for round in range(5):
        key = f"pim-{round}"
        bodies = [body] * 6 + [{**body, "priority": 1}] * 2
        barrier = threading.Barrier(len(bodies))
        answers: list[tuple[bool, httpx.Response]] = []

        def post(i, b, key=key, barrier=barrier, answers=answers):
            barrier.wait()
            r = replicas[i % len(replicas)].post("/v1/jobs", json=b, headers={**auth(KEY_A), "idempotency-key": key})
            answers.append((b is body, r))

        threads = [threading.Thread(target=post, args=(i, b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ids = {r.json()["id"] for _, r in answers if r.status_code in (200, 202)}
        assert len(ids) == 1, [(r.status_code, r.text) for _, r in answers]
        (job_id,) = ids
        first_body_won = svc.store.load(job_id).priority == 0
        for first_body, r in answers:
            if first_body != first_body_won:
                assert r.status_code == 409 and "Idempotency-Key" in r.text, r.text
        winners = sorted(r.status_code for first_body, r in answers if first_body == first_body_won)
        assert winners == [200] * (len(winners) - 1) + [202]
        assert len(svc.store.events(job_id, "created")) == 1
    assert len(svc.store.all()) == 5
