"""The HTTP routes of asynchronous jobs and OpenAI's Batch API, as a FastAPI router.

The routes reach their `JobsService` through the `jobs_service` dependency: the Serve ingress
provides its replica's service, a test provides one of its own (LitServe's way: the hooks are
tested without a server). A tenant is the caller's API key (a digest of it, never the key).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app.asyncjobs import batch, submit, webhooks
from app.asyncjobs.queue import QueuePolicy, queue_position
from app.asyncjobs.records import JobError, JobNotFound, JobRecord, JobStore
from app.serve.bodies import strict_json, text_problem

router = APIRouter(tags=["jobs"])


class Unauthorized(JobError):
    status = 401


@dataclass
class JobsService:
    store: JobStore
    policy: QueuePolicy = field(default_factory=QueuePolicy)
    keys: tuple[str, ...] = ()
    allow_private_webhooks: bool = False
    ray_jobs: submit.RayJobs | None = None  # None: jobs are recorded and queued; a runner elsewhere starts them
    batch_spec: dict = field(default_factory=dict)  # the spec a batch's lines are rendered with
    image_url: Callable[[dict], str] = lambda row: row.get("uri") or ""

    @property
    def files(self) -> batch.FileStore:
        return batch.FileStore(self.store)

    def tenant(self, request: Request) -> str:
        if not self.keys:
            return "anyone"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if (
            scheme.lower() != "bearer"
            or not given
            or not sum(hmac.compare_digest(given, k.encode()) for k in self.keys)
        ):
            raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")
        return hashlib.sha256(given).hexdigest()[:16]

    # --- jobs ----------------------------------------------------------------------------------

    def create_job(
        self, tenant: str, body: Any, idempotency_key: str | None, *, kind: str = "job"
    ) -> tuple[dict, bool]:
        spec, rows = submit.parse_submission(body)
        hook = None
        if body.get("webhook") is not None:
            hook = webhooks.check_webhook_request(body["webhook"], allow_private=self.allow_private_webhooks)
        if idempotency_key is None or self.store._idempotent(tenant, idempotency_key) is None:
            self.policy.check_lane()  # refused before anything is recorded: no GPU is left for bulk jobs
            self.policy.check_in_flight(tenant, self.store.all())
        if rows is not None:
            self.policy.check_rows(len(rows))
        rec, created = self.store.create(
            tenant, body, priority=body.get("priority", 0), kind=kind, idempotency_key=idempotency_key, webhook=hook
        )
        if created:
            if isinstance(body.get("metadata"), dict):
                rec.metadata = dict(body["metadata"])
            try:
                submit.prepare(self.store, rec, spec, rows, self.policy)
            except JobError as e:
                self.store.transition(rec.id, "failed", error=str(e))
                raise
        view = self.job_view(self.store.load(rec.id))
        if created and hook:
            view["webhook_secret"] = hook["secret"]  # returned once
        return view, created

    def job_view(self, rec: JobRecord) -> dict:
        view = rec.public()
        view["object"] = "job"
        view["queue_position"] = queue_position(rec, self.store.all()) if rec.state == "queued" else None
        view["progress"] = submit.progress(self.store, rec)
        return view

    def cancel(self, rec: JobRecord) -> JobRecord:
        if rec.state == "running" and self.ray_jobs is not None:
            return self.ray_jobs.stop(self.store, rec)
        return self.store.transition(rec.id, "cancelled")

    # --- batches -------------------------------------------------------------------------------

    def batch_view(self, tenant: str, rec: JobRecord) -> dict:
        if rec.state in ("succeeded", "failed", "cancelled") and not rec.metadata.get("output_file_id"):
            content = self.files.content(rec.metadata["input_file_id"], tenant)
            ids = [r["custom_id"] for r in batch.parse_lines(content)]
            out, err, final = batch.results(self.store, rec, ids, self.image_url)
            rec.metadata["output_file_id"] = self.files.create(
                tenant, batch.jsonl(out), purpose="batch_output", filename=f"{rec.id}_output.jsonl"
            ).id
            if err:
                rec.metadata["error_file_id"] = self.files.create(
                    tenant, batch.jsonl(err), purpose="batch_output", filename=f"{rec.id}_error.jsonl"
                ).id
            rec.metadata["request_counts"] = final
            self.store.update(rec)
        counts: dict | None = rec.metadata.get("request_counts")
        if counts is None:
            done = submit.progress(self.store, rec)["images_done"]
            counts = {"total": rec.rows or 0, "completed": min(done, rec.rows or 0), "failed": 0}
        return batch.batch_object(rec, counts)


def jobs_service() -> JobsService:
    """Provided by whoever mounts the router (`app.dependency_overrides[jobs_service] = …`)."""
    raise RuntimeError("asynchronous jobs are not configured on this server")


def _error(e: JobError) -> JSONResponse:
    return JSONResponse(
        status_code=e.status,
        content={"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": e.status}},
        headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None,
    )


async def _json(request: Request) -> Any:
    """The body as strict JSON, whatever its Content-Type (`BodyError`, a 4xx naming the field)."""
    return strict_json(await request.body() or b"null")


def _form_text(value: bytes | str | None, what: str) -> str:
    """A multipart field or file name as text: UTF-8, no NUL, no lone surrogates."""
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else (value or "")
    except UnicodeDecodeError:
        raise JobError(f"{what} is not UTF-8 text") from None
    if problem := text_problem(text):
        raise JobError(f"{what} {problem}")
    return text


def _int(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise JobError(f"{name}: expected an integer, got {value!r}") from None


async def _answer(work) -> Response:
    # A failing output store (`StorageError`) is left to the app that mounts the router: `imagefab
    # serve` answers it 507 when full, else 503, naming the store, as on every other route.
    try:
        return await work()
    except JobError as e:
        return _error(e)


Service = Depends(jobs_service)


@router.post("/v1/jobs", status_code=202)
async def create_job(request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        body = await _json(request)
        view, created = svc.create_job(tenant, body, request.headers.get("idempotency-key"))
        return JSONResponse(view, status_code=202 if created else 200)

    return await _answer(work)


@router.get("/v1/jobs")
async def list_jobs(request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        q = request.query_params
        page, more = svc.store.list_jobs(
            tenant,
            state=q.get("state"),
            kind=q.get("kind"),
            limit=_int(q.get("limit"), "limit", 20),
            after=q.get("after"),
        )
        return JSONResponse({"object": "list", "data": [svc.job_view(r) for r in page], "has_more": more})

    return await _answer(work)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request, svc: JobsService = Service):
    async def work():
        return JSONResponse(svc.job_view(svc.store.get(job_id, svc.tenant(request))))

    return await _answer(work)


@router.get("/v1/jobs/{job_id}/images")
async def job_images(job_id: str, request: Request, svc: JobsService = Service):
    async def work():
        rec = svc.store.get(job_id, svc.tenant(request))
        q = request.query_params
        limit, offset = _int(q.get("limit"), "limit", 50), _int(q.get("offset"), "offset", 0)
        rows, total = submit.images(svc.store, rec, limit=limit, offset=offset)
        for r in rows:
            r["url"] = svc.image_url(r)
        return JSONResponse({"object": "list", "data": rows, "total": total, "has_more": offset + len(rows) < total})

    return await _answer(work)


@router.post("/v1/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, svc: JobsService = Service):
    async def work():
        rec = svc.store.get(job_id, svc.tenant(request))
        # Stopping a running Ray job waits for it (seconds): off the event loop, other requests go on.
        return JSONResponse(svc.job_view(await asyncio.to_thread(svc.cancel, rec)))

    return await _answer(work)


@router.post("/v1/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        rec = svc.store.get(job_id, tenant)
        svc.policy.check_lane()
        svc.policy.check_in_flight(tenant, svc.store.all())
        return JSONResponse(svc.job_view(svc.store.transition(rec.id, "queued")))

    return await _answer(work)


# --- OpenAI Files and Batches ------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        raw = await request.body()
        svc.policy.check_upload(len(raw))
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise JobError("POST /v1/files takes multipart/form-data with `purpose` and `file`")
        msg = BytesParser(policy=HTTP).parsebytes(f"content-type: {ctype}\r\n\r\n".encode() + raw)
        parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
        if "file" not in parts or "purpose" not in parts:
            raise JobError("multipart fields `file` and `purpose` are required")
        purpose = _form_text(parts["purpose"].get_payload(decode=True), "multipart field `purpose`").strip()
        content = parts["file"].get_payload(decode=True) or b""
        name = _form_text(parts["file"].get_filename(), "the file name") or "upload.jsonl"
        f = svc.files.create(tenant, content, purpose=purpose, filename=name)
        return JSONResponse(f.public())

    return await _answer(work)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request, svc: JobsService = Service):
    async def work():
        return JSONResponse(svc.files.get(file_id, svc.tenant(request)).public())

    return await _answer(work)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request, svc: JobsService = Service):
    async def work():
        data = svc.files.content(file_id, svc.tenant(request))
        return Response(content=data, media_type="application/jsonl")

    return await _answer(work)


@router.post("/v1/batches")
async def create_batch(request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        body = await _json(request)
        if not isinstance(body, dict):
            raise JobError("the body is a JSON object")
        if body.get("endpoint") != batch.ENDPOINT:
            raise JobError(f"endpoint {body.get('endpoint')!r}: only {batch.ENDPOINT} is served in batches")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise JobError("input_file_id is required")
        requests = batch.parse_lines(svc.files.content(file_id, tenant))
        spec, rows = batch.batch_spec(svc.batch_spec, requests)
        job_body = {"spec": spec, "rows": rows}
        meta = {
            "input_file_id": file_id,
            "completion_window": body.get("completion_window", "24h"),
            "user_metadata": body.get("metadata"),
        }
        view, _ = svc.create_job(
            tenant, {**job_body, "metadata": meta}, request.headers.get("idempotency-key"), kind="batch"
        )
        rec = svc.store.load(view["id"])
        return JSONResponse(svc.batch_view(tenant, rec))

    return await _answer(work)


def _batch(svc: JobsService, batch_id: str, tenant: str) -> JobRecord:
    rec = svc.store.get(batch_id, tenant)
    if rec.kind != "batch":
        raise JobNotFound(f"no batch {batch_id!r}")
    return rec


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        return JSONResponse(svc.batch_view(tenant, _batch(svc, batch_id, tenant)))

    return await _answer(work)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, svc: JobsService = Service):
    async def work():
        tenant = svc.tenant(request)
        rec = await asyncio.to_thread(svc.cancel, _batch(svc, batch_id, tenant))
        return JSONResponse(svc.batch_view(tenant, rec))

    return await _answer(work)
