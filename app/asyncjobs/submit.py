"""Running a job: its spec and rows written next to its record, the same entrypoint as
`ray job submit … -- python -m jobs.generate SPEC --run-id ID`, and progress read from the catalog.

Resume is the same command again: the run id is fixed per job, and jobs.generate skips every
image the catalog already holds, so nothing is rendered twice and nothing is lost.
"""

from __future__ import annotations

import io
import shlex
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from app.asyncjobs.queue import QueuePolicy
from app.asyncjobs.records import JOBS_DIR, JobError, JobRecord, JobStore
from app.catalog.store import CatalogStore
from app.spec import JobSpec, SpecError, parse_spec

RAY_TO_STATE = {
    "PENDING": "running",  # submitted: Ray is starting the driver
    "RUNNING": "running",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "STOPPED": "cancelled",
}


def parse_submission(body: Any) -> tuple[dict, list[dict] | None]:
    """`{"spec": {…}}` or `{"spec_yaml": "…"}`, and optional inline `rows`: the spec as a mapping
    and the rows, with errors naming the field."""
    if not isinstance(body, dict):
        raise JobError(f"the request body is a JSON object, got {type(body).__name__}")
    unknown = set(body) - {"spec", "spec_yaml", "rows", "priority", "webhook", "metadata", *QUOTA_FIELDS}
    if unknown:
        raise JobError(
            f"unknown field(s) {', '.join(sorted(unknown))} (fields: spec, spec_yaml, rows, priority, webhook, "
            f"{', '.join(QUOTA_FIELDS)})"
        )
    if ("spec" in body) == ("spec_yaml" in body):
        raise JobError("give exactly one of `spec` (a mapping) or `spec_yaml` (YAML text)")
    if "spec_yaml" in body:
        if not isinstance(body["spec_yaml"], str):
            raise JobError("spec_yaml: expected YAML text")
        try:
            spec = yaml.safe_load(body["spec_yaml"])
        except yaml.YAMLError as e:
            raise JobError(f"spec_yaml: not valid YAML ({e})") from None
    else:
        spec = body["spec"]
    if not isinstance(spec, dict):
        raise JobError(f"spec: expected a mapping of spec fields, got {type(spec).__name__}")
    rows = body.get("rows")
    if rows is not None:
        if not isinstance(rows, list) or not rows:
            raise JobError("rows: expected a non-empty list of objects")
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not r:
                raise JobError(f"rows[{i}]: expected an object of column values, got {r!r}")
    prio = body.get("priority", 0)
    if not isinstance(prio, int) or isinstance(prio, bool) or not -100 <= prio <= 100:
        raise JobError(f"priority: expected an integer from -100 to 100, got {prio!r}")
    return with_quota(spec, body), rows


# Shorthands of the body for spec fields: a quota per row and a cost cap on the job.
QUOTA_FIELDS = ("accepted_per_row", "max_attempts_per_row", "max_cost_usd")


def with_quota(spec: dict, body: dict) -> dict:
    """The spec with the body's `accepted_per_row` / `max_attempts_per_row` (variations) and
    `max_cost_usd` (budget) set; validated with the spec."""
    given = {k: body[k] for k in QUOTA_FIELDS if body.get(k) is not None}
    if not given:
        return spec
    spec = dict(spec)
    variations = dict(spec.get("variations") or {})
    for key in ("accepted_per_row", "max_attempts_per_row"):
        if key in given:
            variations[key] = given[key]
    if "accepted_per_row" in given:
        variations.pop("seeds_per_row", None)  # the quota replaces a count of seeds
    if variations:
        spec["variations"] = variations
    if "max_cost_usd" in given:
        spec["budget"] = {**(spec.get("budget") or {}), "max_cost_usd": given["max_cost_usd"]}
    return spec


def rows_table(rows: list[dict]) -> pa.Table:
    """Inline rows as a Parquet-ready table of strings (as a CSV input is read)."""
    columns: dict[str, list] = {}
    for r in rows:
        for k in r:
            columns.setdefault(str(k), [])
    for r in rows:
        for k in columns:
            v = r.get(k)
            columns[k].append(None if v is None else str(v))
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


def prepare(store: JobStore, rec: JobRecord, spec_data: dict, rows: list[dict] | None, policy: QueuePolicy) -> JobSpec:
    """Validate the spec as the CLI does, write `jobs/<id>/spec.yaml` (and `rows.parquet`) and
    point the record at them. The spec's output is the store the record lives in."""
    data = dict(spec_data)
    base = f"{JOBS_DIR}/{rec.id}"
    if rows is not None:
        policy.check_rows(len(rows))
        buf = io.BytesIO()
        pq.write_table(rows_table(rows), buf)
        rows_uri = store.output.write_bytes(f"{base}/rows.parquet", buf.getvalue())
        given = data.get("input")
        inp: dict = given if isinstance(given, dict) else {}
        data["input"] = {**inp, "path": rows_uri, "format": "parquet"}
    data["output"] = {**(data.get("output") or {}), "uri": store.output.uri}
    try:
        spec = parse_spec(data, where="spec")
        overrides = policy.bulk_overrides(spec.compute.model_dump())
        if overrides:
            spec = spec.with_overrides(**overrides)
    except SpecError as e:
        raise JobError(str(e)) from None
    dumped = spec.model_dump(mode="json", exclude_unset=True)
    rec.spec_uri = store.output.write_bytes(f"{base}/spec.yaml", yaml.safe_dump(dumped, sort_keys=False).encode())
    rec.rows = len(rows) if rows is not None else None
    if rec.rows is not None:
        n = min(rec.rows, spec.input.limit) if spec.input.limit else rec.rows
        rec.expected_images = n * spec.images_per_row  # with a quota: the accepted images asked for
    store.update(rec)
    return spec


def entrypoint(spec_path: str, run_id: str, *, python: str = "python", mlflow: bool = False) -> str:
    """The command `ray job submit` would run; a resume runs the same one."""
    argv = [python, "-m", "jobs.generate", spec_path, "--run-id", run_id, "--quiet"]
    if not mlflow:
        argv.append("--no-mlflow")
    return shlex.join(argv)


@dataclass
class RayJobs:
    """Ray's job submission API at `address` (the dashboard, http://HEAD:8265)."""

    address: str  # "" when there is none: every call then raises JobError saying so
    runtime_env: dict | None = None  # e.g. {"working_dir": "."} on a remote cluster
    python: str = "python"

    def _client(self):
        if not self.address:
            raise JobError(
                "no Ray dashboard to submit jobs through: the cluster runs none; name one with "
                "jobs.ray_dashboard in the server's config or $RAY_DASHBOARD_ADDRESS"
            )
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def start(self, store: JobStore, rec: JobRecord) -> JobRecord:
        """Submit the job (a first start or a resume) and mark it running."""
        if not rec.spec_uri:
            raise JobError(f"job {rec.id} has no spec written yet")
        spec_path = rec.spec_uri if not store.output.is_local else store.output.path(store.output.rel_of(rec.spec_uri))
        sub_id = f"imagefab-{rec.id}-{len(rec.submissions) + 1}"
        try:
            self._client().submit_job(
                entrypoint=entrypoint(spec_path, rec.run_id, python=self.python),
                submission_id=sub_id,
                runtime_env=self.runtime_env,
                metadata={"imagefab_job": rec.id},
            )
        except RuntimeError as e:
            # Submission ids are fixed per job and start, so an answer lost on the way back (or a
            # second runner) finds the job already submitted: that start has happened.
            if "already exists" not in str(e):
                raise
        store.event(rec.id, "submitted", submission_id=sub_id)
        return store.transition(rec.id, "running", submissions=[*rec.submissions, sub_id])

    def stop(self, store: JobStore, rec: JobRecord, *, wait_s: float = 30.0) -> JobRecord:
        """Cancel: a queued job never starts; a running one's Ray job is stopped and waited for
        (up to `wait_s`), so a resume never runs beside it. What is catalogued stays."""
        if rec.state == "running" and rec.submissions:
            sub_id = rec.submissions[-1]
            try:
                client = self._client()
                client.stop_job(sub_id)
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline:
                    if str(client.get_job_status(sub_id)).rsplit(".", 1)[-1] in ("STOPPED", "SUCCEEDED", "FAILED"):
                        break
                    time.sleep(0.5)
                else:
                    store.event(rec.id, "stop_pending", submission_id=sub_id, waited_s=wait_s)
            except Exception as e:  # the cluster is gone: nothing is running to stop
                store.event(rec.id, "stop_failed", submission_id=sub_id, error=str(e))
        return store.transition(rec.id, "cancelled")

    def sync(self, store: JobStore, rec: JobRecord) -> JobRecord:
        """Bring a running job's state in line with Ray's. A submission the cluster no longer knows
        (its head was restarted) makes the job `failed` with that reason: resume finishes it."""
        if rec.state != "running" or not rec.submissions:
            return rec
        sub_id = rec.submissions[-1]
        try:
            info = self._client().get_job_info(sub_id)
        except Exception as e:
            text = str(e)
            if "does not exist" in text or "404" in text or "not found" in text.lower():
                return store.transition(
                    rec.id, "failed", error=f"the cluster has no record of Ray job {sub_id}; resume the job"
                )
            raise JobError(f"cannot reach the Ray cluster at {self.address}: {e}") from e
        state = RAY_TO_STATE.get(str(info.status).rsplit(".", 1)[-1], "running")
        if state == rec.state:
            return rec
        error = (info.message or "")[-2000:] if state == "failed" else None
        return store.transition(rec.id, state, **({"error": error} if error else {}))

    def logs(self, rec: JobRecord) -> str:
        return self._client().get_job_logs(rec.submissions[-1]) if rec.submissions else ""


def run_rows(store: JobStore, rec: JobRecord, columns: list[str]) -> pa.Table:
    """The job's catalog rows (the catalog's read lists again when the run's closing compaction
    deletes a file under it: see `CatalogStore.read`)."""
    return CatalogStore(store.output).read(columns, filter=pads.field("run_id") == rec.run_id)


def progress(store: JobStore, rec: JobRecord, *, now: float | None = None) -> dict:
    """Counts by QC status so far, images/s, ETA, device seconds and cost, from the job's catalog rows."""
    t = run_rows(store, rec, ["status", "gpu_seconds", "cpu_seconds", "cost_usd", "created_at"])
    counts = {"accepted": 0, "review": 0, "rejected": 0, "failed": 0}
    for s in t.column("status").to_pylist():
        counts[s] = counts.get(s, 0) + 1
    done = t.num_rows

    def total(col: str) -> float:
        return float(sum(v for v in t.column(col).to_pylist() if v is not None))

    rate = 0.0
    if done and rec.started_at:
        end = rec.finished_at or (now if now is not None else time.time())
        rate = done / max(end - rec.started_at, 1e-6)
    eta = None
    if rec.expected_images is not None and rate > 0 and rec.state == "running":
        eta = max(0, rec.expected_images - done) / rate
    return {
        "images_done": done,
        "images_total": rec.expected_images,
        "counts": counts,
        "images_per_second": round(rate, 4),
        "eta_seconds": None if eta is None else round(eta, 1),
        "gpu_seconds": round(total("gpu_seconds"), 3),
        "cpu_seconds": round(total("cpu_seconds"), 3),
        "cost_usd": round(total("cost_usd"), 6),
    }


def images(store: JobStore, rec: JobRecord, *, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    """A page of the job's catalog rows (id, status, prompt, row key, master and variant URIs)."""
    if not 1 <= limit <= 500 or offset < 0:
        raise JobError(f"limit must be 1..500 and offset ≥ 0 (got limit={limit}, offset={offset})")
    cols = ["image_id", "status", "reasons", "error", "prompt", "row_key", "seed", "uri", "variants", "created_at"]
    t = run_rows(store, rec, cols)
    t = t.sort_by([("created_at", "ascending"), ("image_id", "ascending")])
    page = t.slice(offset, limit).to_pylist()
    for r in page:
        r["created_at"] = r["created_at"].isoformat() if r["created_at"] else None
    return page, t.num_rows
