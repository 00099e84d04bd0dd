"""The durable job record, kept with the outputs so that it survives a restart of Serve or the head.

    jobs/<id>/job.json               the current record, rewritten atomically on each change
    jobs/<id>/events/<seq>-<rand>.json   one object per event, never rewritten (works on object stores)
    jobs/idempotency/<tenant>/<key>.json the job an Idempotency-Key named, with the body's digest

An Idempotency-Key is claimed before its job exists: the claim is created only if absent (on a local
disk a hard link, which fails when the name exists), and the job's id is derived from the tenant and
the key. So concurrent requests with one key, in threads or in separate ingress replicas, make
one job: the first claim wins, the others answer with its job (or 409 for another body). Object
stores have no create-if-absent in pyarrow: there the claim is a check then a write, and the derived
id still makes racing requests name the same job.

A job's state moves only along LEGAL transitions; a resumed job goes back to `queued`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from app.storage import OutputStore, StorageError

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
LEGAL = {
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled"}),
    "failed": frozenset({"queued"}),  # resume
    "cancelled": frozenset({"queued"}),  # resume
    "succeeded": frozenset(),
}
JOBS_DIR = "jobs"


class JobError(ValueError):
    """A request about a job that cannot be honoured; `status` is the HTTP status it maps to."""

    status = 400


class JobNotFound(JobError):
    status = 404


class IdempotencyConflict(JobError):
    status = 409


class IllegalTransition(JobError):
    status = 409


def body_digest(body: Any) -> str:
    """The digest of a request body as JSON with sorted keys: the same body in another key order is the same."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotent_job_id(tenant: str, key: str) -> str:
    """The id of the job a tenant's Idempotency-Key makes: the same for every request with that key."""
    return "job_" + hashlib.sha256(tenant.encode() + b"\0" + key.encode()).hexdigest()[:32]


def _tenant_dir(tenant: str) -> str:
    # API key ids may hold any character; the folder name must not.
    return hashlib.sha256(tenant.encode()).hexdigest()[:24]


@dataclass
class JobRecord:
    id: str
    tenant: str
    state: str = "queued"
    priority: int = 0
    kind: str = "job"  # job | batch
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    run_id: str = ""  # the catalog's run_id: the same on every resume, so resume renders only what is missing
    spec_uri: str = ""  # the spec as submitted (its input pointing at rows.parquet when rows were inline)
    rows: int | None = None  # input rows when known at submission
    expected_images: int | None = None
    submissions: list[str] = field(default_factory=list)  # Ray job submission ids, one per start
    idempotency_key: str | None = None
    body_sha256: str = ""
    webhook: dict | None = None  # {"url", "events", "secret", "progress_every_images", "progress_every_s"}
    error: str | None = None
    metadata: dict = field(default_factory=dict)
    outbox: list[dict] = field(default_factory=list)  # webhook events owed to the receiver (`_add_to_outbox`)

    def public(self) -> dict:
        """What a client may see: everything but the webhook's signing secret."""
        d = asdict(self)
        if d["webhook"]:
            d["webhook"] = {k: v for k, v in d["webhook"].items() if k != "secret"}
        d.pop("tenant")
        d.pop("outbox")
        return d


# The webhook event a state change is, for a job whose webhook asked for it.
STATE_EVENT = {"running": "started", "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}


def _add_to_outbox(rec: JobRecord, state: str, at: float) -> None:
    """The webhook outbox: each state change the job's webhook asked for is recorded in the same
    write as the change itself, so a runner that dies before sending it (or a change made by the
    ingress, such as a cancel) still gets its webhook: the next runner sends what is in the outbox
    and not yet delivered (app/asyncjobs/runner.py). Entries are only ever appended."""
    event = STATE_EVENT.get(state)
    if event is None or not rec.webhook or event not in rec.webhook.get("events", ()):
        return
    entry: dict[str, Any] = {"key": f"{len(rec.outbox) + 1}-{event}", "event": event, "at": at}
    if event == "started" and rec.submissions:
        entry["submission_id"] = rec.submissions[-1]
    rec.outbox.append(entry)


@dataclass(frozen=True)
class JobStore:
    output: OutputStore

    # --- records -----------------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        body: Any,
        *,
        priority: int = 0,
        kind: str = "job",
        idempotency_key: str | None = None,
        webhook: dict | None = None,
        job_id: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """A new queued job, or (with an Idempotency-Key already used for the same body) the job
        that key made, and False. The same key with a different body is a conflict."""
        digest = body_digest(body)
        if idempotency_key is not None:
            job_id = job_id or idempotent_job_id(tenant, idempotency_key)
            claim = json.dumps({"job_id": job_id, "body_sha256": digest}).encode()
            if not self._claim(self._idem_rel(tenant, idempotency_key), claim):
                existing = self._idempotent(tenant, idempotency_key) or {}
                if existing.get("body_sha256") != digest:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was used for job {existing.get('job_id')} with a "
                        "different body; use a new key for a different request"
                    )
                found = self._wait_for(existing["job_id"], tenant)
                if found is not None:
                    return found, False
                # The claim's maker never wrote the job (it died in between): the id is derived, so
                # writing it here makes the same job it would have made.
        rec = JobRecord(
            id=job_id or f"job_{uuid.uuid4().hex}",
            tenant=tenant,
            priority=priority,
            kind=kind,
            idempotency_key=idempotency_key,
            body_sha256=digest,
            webhook=webhook,
        )
        rec.run_id = rec.id.removeprefix("job_").removeprefix("batch_")
        rec.updated_at = rec.created_at
        self.save(rec)
        self.event(rec.id, "created", state="queued", priority=priority)
        return rec, True

    def save(self, rec: JobRecord) -> None:
        self.output.write_bytes(f"{JOBS_DIR}/{rec.id}/job.json", json.dumps(asdict(rec), indent=1).encode())

    def load(self, job_id: str) -> JobRecord:
        """A record whoever owns it (the dispatcher and the watcher use this; clients use `get`)."""
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise JobNotFound(f"no job {job_id!r}")
        try:
            raw = self.output.read_bytes(f"{JOBS_DIR}/{job_id}/job.json")
        except StorageError:
            raise JobNotFound(f"no job {job_id!r}") from None
        return JobRecord(**json.loads(raw))

    def get(self, job_id: str, tenant: str) -> JobRecord:
        """The tenant's job; another tenant's job is reported as missing, never as forbidden."""
        rec = self.load(job_id)
        if rec.tenant != tenant:
            raise JobNotFound(f"no job {job_id!r}")
        return rec

    def transition(self, job_id: str, state: str, **changes: Any) -> JobRecord:
        if state not in STATES:
            raise JobError(f"state {state!r} is not one of {', '.join(STATES)}")
        rec = self.load(job_id)
        if state not in LEGAL[rec.state]:
            allowed = ", ".join(sorted(LEGAL[rec.state])) or "none (it is final)"
            raise IllegalTransition(f"job {job_id} is {rec.state}: it cannot become {state} (allowed: {allowed})")
        now = time.time()
        rec.state, rec.updated_at = state, now
        if state == "running" and rec.started_at is None:
            rec.started_at = now
        if state in TERMINAL:
            rec.finished_at = now
        if state == "queued":
            rec.finished_at, rec.error = None, None
        for k, v in changes.items():
            if not hasattr(rec, k):
                raise JobError(f"a job record has no field {k!r}")
            setattr(rec, k, v)
        _add_to_outbox(rec, state, now)
        self.save(rec)
        self.event(job_id, "state", state=state, **{k: v for k, v in changes.items() if k in ("error",)})
        return rec

    def update(self, rec: JobRecord) -> None:
        rec.updated_at = time.time()
        self.save(rec)

    # --- events --------------------------------------------------------------------------------

    def event(self, job_id: str, type: str, **data: Any) -> dict:
        """Record one event as its own object: never rewritten, so concurrent writers lose nothing."""
        ev = {"type": type, "at": time.time(), **data}
        seq = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self.output.write_bytes(f"{JOBS_DIR}/{job_id}/events/{seq}.json", json.dumps(ev).encode())
        return ev

    def events(self, job_id: str, type: str | None = None) -> list[dict]:
        names = self._list(f"{JOBS_DIR}/{job_id}/events")
        out = []
        for name in sorted(n for n in names if n.endswith(".json")):
            ev = json.loads(self.output.read_bytes(f"{JOBS_DIR}/{job_id}/events/{name}"))
            if type is None or ev["type"] == type:
                out.append(ev)
        return out

    # --- listing -------------------------------------------------------------------------------

    def all(self) -> list[JobRecord]:
        recs = []
        for name in self._list(JOBS_DIR):
            if name == "idempotency":
                continue
            try:
                recs.append(self.load(name))
            except JobNotFound:
                continue  # a folder whose record is not written yet
        return recs

    def list_jobs(
        self,
        tenant: str,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> tuple[list[JobRecord], bool]:
        """The tenant's jobs, newest first; `after` is the last id of the previous page. Returns the
        page and whether there is more."""
        if state is not None and state not in STATES:
            raise JobError(f"state filter {state!r} is not one of {', '.join(STATES)}")
        if not 1 <= limit <= 100:
            raise JobError(f"limit {limit} must be between 1 and 100")
        recs = [
            r
            for r in self.all()
            if r.tenant == tenant and (state is None or r.state == state) and (kind is None or r.kind == kind)
        ]
        recs.sort(key=lambda r: (-r.created_at, r.id))
        if after is not None:
            ids = [r.id for r in recs]
            if after not in ids:
                raise JobError(f"after={after!r}: no such job in this listing")
            recs = recs[ids.index(after) + 1 :]
        return recs[:limit], len(recs) > limit

    # --- helpers -------------------------------------------------------------------------------

    def _idem_rel(self, tenant: str, key: str) -> str:
        return f"{JOBS_DIR}/idempotency/{_tenant_dir(tenant)}/{hashlib.sha256(key.encode()).hexdigest()}.json"

    def _claim(self, rel: str, data: bytes) -> bool:
        """Create `rel` holding `data` only if it does not exist; whether this call created it."""
        if not self.output.is_local:
            try:
                self.output.read_bytes(rel)
                return False
            except StorageError:
                self.output.write_bytes(rel, data)
                return True
        final = Path(self.output.path(rel))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.link(tmp, final)  # atomic, and refuses an existing name: readers never see half a claim
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise StorageError(f"{self.output.uri_of(rel)}: cannot write ({e.strerror or e})") from e
        finally:
            tmp.unlink(missing_ok=True)

    def _wait_for(self, job_id: str, tenant: str, timeout_s: float = 10.0) -> JobRecord | None:
        """The job a claim names, once its maker has written it (a few milliseconds after the claim)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.get(job_id, tenant)
            except JobNotFound:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.02)

    def _idempotent(self, tenant: str, key: str) -> dict | None:
        try:
            return json.loads(self.output.read_bytes(self._idem_rel(tenant, key)))
        except StorageError:
            return None

    def _list(self, rel: str) -> list[str]:
        fs, _ = self.output.fs_and_root
        try:
            infos = fs.get_file_info(pafs.FileSelector(self.output.path(rel), allow_not_found=True))
        except OSError as e:
            raise StorageError(f"{self.output.uri_of(rel)}: cannot list ({e})") from e
        return [i.base_name for i in infos if not i.base_name.startswith(".")]
