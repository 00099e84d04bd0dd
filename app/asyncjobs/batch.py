"""OpenAI's Batch API over bulk jobs: uploaded files, batches, and output/error files.

    files/<id>/meta.json, files/<id>/content     an uploaded JSONL or a batch's output/error file
    a batch is a job (kind "batch") whose rows come from the file's lines, keyed by custom_id

Each input line is `{"custom_id", "method": "POST", "url": "/v1/images/generations", "body":
{"prompt", "n"?, "size"?, "model"?, "response_format"?}}`. A batch is one spec, so `n` and
`size` must be the same on every line (they become the spec's seeds_per_row and size).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from app.asyncjobs.records import JobError, JobNotFound, JobRecord, JobStore
from app.asyncjobs.submit import run_rows
from app.serve.bodies import BodyError, strict_json
from app.storage import StorageError

ENDPOINT = "/v1/images/generations"
BATCH_STATE = {
    "queued": "validating",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}
BODY_FIELDS = {"prompt", "n", "size", "model", "response_format", "quality", "style", "user", "negative_prompt"}


class BatchLineError(JobError):
    """A line of a batch input file is not a valid request; the message names the line."""


@dataclass
class FileObject:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    object: str = "file"
    status: str = "processed"

    def public(self) -> dict:
        d = asdict(self)
        d.pop("tenant")
        return d


@dataclass(frozen=True)
class FileStore:
    store: JobStore

    def create(self, tenant: str, content: bytes, *, purpose: str, filename: str) -> FileObject:
        if purpose not in ("batch", "batch_output"):
            raise JobError(f"purpose {purpose!r}: only 'batch' files are accepted")
        if purpose == "batch":
            parse_lines(content)  # refuse a bad file at upload, naming the line
        f = FileObject(f"file-{uuid.uuid4().hex}", tenant, purpose, filename, len(content), int(time.time()))
        out = self.store.output
        out.write_bytes(f"files/{f.id}/content", content)
        out.write_bytes(f"files/{f.id}/meta.json", json.dumps(asdict(f)).encode())
        return f

    def get(self, file_id: str, tenant: str) -> FileObject:
        if not file_id.startswith("file-") or "/" in file_id:
            raise JobNotFound(f"no file {file_id!r}")
        try:
            f = FileObject(**json.loads(self.store.output.read_bytes(f"files/{file_id}/meta.json")))
        except StorageError:
            raise JobNotFound(f"no file {file_id!r}") from None
        if f.tenant != tenant:
            raise JobNotFound(f"no file {file_id!r}")
        return f

    def content(self, file_id: str, tenant: str) -> bytes:
        self.get(file_id, tenant)
        return self.store.output.read_bytes(f"files/{file_id}/content")


def _size(value: Any, where: str) -> tuple[int, int]:
    w, sep, h = str(value).partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise BatchLineError(f"{where}: size {value!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
    return int(w), int(h)


def parse_lines(content: bytes) -> list[dict]:
    """The requests of a batch input file, each `{"custom_id", "prompt", "n", "size", …}`."""
    try:
        text = content.decode()
    except UnicodeDecodeError:
        raise BatchLineError("the batch file is not UTF-8 text") from None
    out: list[dict] = []
    seen: set[str] = set()
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {no}"
        try:
            obj = strict_json(line)  # as an HTTP body: no NaN, no 2**64, no lone surrogates, no NUL
        except BodyError as e:
            raise BatchLineError(f"{where}: {e.field + ': ' if e.field else ''}{e.message}") from None
        if not isinstance(obj, dict):
            raise BatchLineError(f"{where}: expected a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise BatchLineError(f"{where}: custom_id must be a non-empty string")
        if cid in seen:
            raise BatchLineError(f"{where}: custom_id {cid!r} is used twice")
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            raise BatchLineError(f"{where}: method {obj.get('method')!r}; only POST")
        if obj.get("url") != ENDPOINT:
            raise BatchLineError(f"{where}: url {obj.get('url')!r}; only {ENDPOINT} is served in batches")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise BatchLineError(f"{where}: body must be an object")
        unknown = set(body) - BODY_FIELDS
        if unknown:
            raise BatchLineError(f"{where}: body has unknown field(s) {', '.join(sorted(unknown))}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BatchLineError(f"{where}: body.prompt must be a non-empty string")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise BatchLineError(f"{where}: body.n {n!r} must be an integer from 1 to 10")
        size = _size(body.get("size", "1024x1024"), where)
        out.append(
            {"custom_id": cid, "prompt": prompt, "negative_prompt": body.get("negative_prompt"), "n": n, "size": size}
        )
    if not out:
        raise BatchLineError("the batch file has no request lines")
    for key in ("n", "size"):
        values = {r[key] for r in out}
        if len(values) > 1:
            raise BatchLineError(f"body.{key} differs between lines ({sorted(values)}): a batch renders one setting")
    return out


def batch_spec(base_spec: dict, requests: list[dict]) -> tuple[dict, list[dict]]:
    """The spec and rows a batch runs as: rows keyed by custom_id, the lines' n and size."""
    spec = dict(base_spec)
    w, h = requests[0]["size"]
    spec["size"] = {"width": w, "height": h}
    spec["variations"] = {**(spec.get("variations") or {}), "seeds_per_row": requests[0]["n"]}
    inp = {k: v for k, v in (spec.get("input") or {}).items() if k in ("template_name",)}
    inp.update({"path": "rows.parquet", "prompt_column": "prompt", "key_column": "custom_id"})
    negative = any(r["negative_prompt"] for r in requests)
    if negative:
        inp["negative_column"] = "negative_prompt"
    spec["input"] = inp
    rows = [
        {
            "custom_id": r["custom_id"],
            "prompt": r["prompt"],
            **({"negative_prompt": r["negative_prompt"] or ""} if negative else {}),
        }
        for r in requests
    ]
    return spec, rows


def batch_object(rec: JobRecord, counts: dict | None = None) -> dict:
    """A job as OpenAI's Batch object."""
    m = rec.metadata
    state = BATCH_STATE[rec.state]
    return {
        "id": rec.id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "input_file_id": m.get("input_file_id"),
        "completion_window": m.get("completion_window", "24h"),
        "status": state,
        "output_file_id": m.get("output_file_id"),
        "error_file_id": m.get("error_file_id"),
        "created_at": int(rec.created_at),
        "in_progress_at": int(rec.started_at) if rec.started_at else None,
        "completed_at": int(rec.finished_at) if rec.finished_at and rec.state == "succeeded" else None,
        "failed_at": int(rec.finished_at) if rec.finished_at and rec.state == "failed" else None,
        "cancelled_at": int(rec.finished_at) if rec.finished_at and rec.state == "cancelled" else None,
        "request_counts": counts or {"total": rec.rows or 0, "completed": 0, "failed": 0},
        "metadata": m.get("user_metadata") or None,
        "errors": {"object": "list", "data": [{"code": "job_failed", "message": rec.error}]} if rec.error else None,
    }


def results(store: JobStore, rec: JobRecord, custom_ids: list[str], url_of) -> tuple[list[dict], list[dict], dict]:
    """Output lines (a request with at least one usable image) and error lines (none, or never
    rendered), in OpenAI's line format, and request_counts. `url_of(row)` gives an image's URL."""
    t = run_rows(store, rec, ["image_id", "row_key", "status", "error", "uri", "created_at"])
    by_key: dict[str, list[dict]] = {}
    for r in t.sort_by([("image_id", "ascending")]).to_pylist():
        by_key.setdefault(r["row_key"], []).append(r)
    output, errors = [], []
    for cid in custom_ids:
        rows = by_key.get(cid, [])
        ok = [r for r in rows if r["status"] != "failed" and r["uri"]]
        line_id = f"batch_req_{uuid.uuid5(uuid.NAMESPACE_URL, rec.id + '/' + cid).hex}"
        if ok:
            created = int(min(r["created_at"] for r in ok).timestamp())
            body = {"created": created, "data": [{"url": url_of(r)} for r in ok]}
            output.append(
                {
                    "id": line_id,
                    "custom_id": cid,
                    "response": {"status_code": 200, "request_id": ok[0]["image_id"], "body": body},
                    "error": None,
                }
            )
        else:
            msg = "; ".join(sorted({r["error"] or r["status"] for r in rows})) or "not rendered"
            code = "image_failed" if rows else "not_rendered"
            errors.append({"id": line_id, "custom_id": cid, "response": None, "error": {"code": code, "message": msg}})
    counts = {"total": len(custom_ids), "completed": len(output), "failed": len(errors)}
    return output, errors, counts


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()
