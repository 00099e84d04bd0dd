"""Webhooks signed the Standard Webhooks way, checked against SSRF, retried with backoff.

Signing: `webhook-signature: v1,<base64 HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")>` with the
headers `webhook-id` and `webhook-timestamp` (Unix seconds); the secret is `whsec_` + base64 of
the key bytes.

SSRF: the target's host is resolved and every address is checked before anything is sent;
loopback, link-local, private, multicast, reserved and unspecified addresses (IPv4, IPv6 and
IPv4-mapped IPv6) are refused unless the server allows private targets
(`IMAGEFAB_WEBHOOK_ALLOW_PRIVATE=1`). The connection then goes to the checked address, so a
second DNS answer cannot redirect it.

Every attempt and its outcome is an event of the job (`webhook_attempt`, `webhook_delivered`,
`webhook_failed`); the render path never sends anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.asyncjobs.records import JobError, JobStore

EVENTS = ("started", "progress", "succeeded", "failed", "cancelled")
ALLOW_PRIVATE_ENV = "IMAGEFAB_WEBHOOK_ALLOW_PRIVATE"


class WebhookTargetRefused(JobError):
    """The webhook URL is not one the server will send to; the message says why."""


def message_id(job_id: str, key: str) -> str:
    """The `webhook-id` of an outbox entry: the same on every attempt and from every runner."""
    return "msg_" + hashlib.sha256(f"{job_id}\0{key}".encode()).hexdigest()[:32]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise JobError("a webhook secret starts with 'whsec_'")
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, *, tolerance_s: int = 300) -> bool:
    """The receiver's check (as in the README): a matching v1 signature and a fresh timestamp."""
    h = {k.lower(): v for k, v in headers.items()}
    ts = int(h["webhook-timestamp"])
    if abs(time.time() - ts) > tolerance_s:
        return False
    expected = sign(secret, h["webhook-id"], ts, body).split(",", 1)[1]
    return any(
        hmac.compare_digest(expected, s.split(",", 1)[1]) for s in h["webhook-signature"].split() if s.startswith("v1,")
    )


def allow_private_from_env() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "") in ("1", "true", "yes")


def refused_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return refused_reason(ip.ipv4_mapped)
    for name in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise WebhookTargetRefused(f"webhook url: cannot resolve host {host!r} ({e.strerror})") from None
    return list(dict.fromkeys(str(i[4][0]) for i in infos))


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the checked address the request goes to


def check_target(url: str, *, allow_private: bool, resolve: Resolver = _resolve) -> Target:
    """Parse, resolve and check a webhook URL; raises WebhookTargetRefused naming the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookTargetRefused(f"webhook url {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise WebhookTargetRefused(f"webhook url {url!r}: no host")
    if parts.username or parts.password:
        raise WebhookTargetRefused(f"webhook url {url!r}: credentials in the URL are not accepted")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookTargetRefused(f"webhook url {url!r}: bad port") from None
    host = parts.hostname
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise WebhookTargetRefused(f"webhook url {url!r}: {host} has no address")
    if not allow_private:
        for a in addresses:
            why = refused_reason(ipaddress.ip_address(a.split("%", 1)[0]))
            if why:
                raise WebhookTargetRefused(
                    f"webhook url {url!r}: {host} resolves to {a}, a {why} address; private targets are "
                    f"allowed only when the server sets {ALLOW_PRIVATE_ENV}=1"
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, parts.scheme, host, port, path, addresses[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the certificate checked for the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(target: Target, headers: dict[str, str], body: bytes, timeout: float) -> int:
    """One POST to the checked address; the HTTP status."""
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = _PinnedHTTPSConnection(target.host, target.address, target.port, timeout)
    else:
        conn = http.client.HTTPConnection(target.address, target.port, timeout=timeout)
    try:
        host_header = target.host if ":" not in target.host else f"[{target.host}]"
        conn.request("POST", target.path, body=body, headers={**headers, "Host": f"{host_header}:{target.port}"})
        resp = conn.getresponse()
        resp.read(65536)
        return resp.status
    finally:
        conn.close()


def check_webhook_request(webhook: Any, *, allow_private: bool, resolve: Resolver = _resolve) -> dict:
    """Validate a job's `webhook` field at submission: {"url", "events"?, "progress_every_images"?,
    "progress_every_s"?}; checks the target and adds a new signing secret."""
    if not isinstance(webhook, dict) or "url" not in webhook:
        raise JobError('webhook: expected {"url": "https://…", "events": [...]}')
    unknown = set(webhook) - {"url", "events", "progress_every_images", "progress_every_s"}
    if unknown:
        raise JobError(f"webhook: unknown field(s) {', '.join(sorted(unknown))}")
    events = webhook.get("events", ["succeeded", "failed", "cancelled"])
    if not isinstance(events, list) or any(e not in EVENTS for e in events):
        raise JobError(f"webhook.events: expected a list of {', '.join(EVENTS)}, got {events!r}")
    out: dict[str, Any] = {"url": str(webhook["url"]), "events": events}
    for k in ("progress_every_images", "progress_every_s"):
        if k in webhook:
            v = webhook[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise JobError(f"webhook.{k}: expected a positive number, got {v!r}")
            out[k] = v
    check_target(out["url"], allow_private=allow_private, resolve=resolve)
    out["secret"] = new_secret()
    return out


@dataclass
class WebhookDispatcher:
    """Delivers one event to a job's webhook: retries with exponential backoff, every attempt and
    the outcome recorded in the job's events. A 2xx is delivered; 4xx other than 408/429 is final."""

    store: JobStore
    allow_private: bool = False
    attempts: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    resolve: Resolver = _resolve

    def deliver(self, job_id: str, event_type: str, data: dict, *, key: str | None = None) -> bool:
        """Send one event. `key` names an outbox entry (app/asyncjobs/records.py): its message id
        is derived from it, so a resend after a restart carries the same `webhook-id` and a
        receiver can drop the duplicate, and its outcome events say which entry they settle."""
        rec = self.store.load(job_id)
        hook = rec.webhook
        if not hook or event_type not in hook.get("events", ()):
            return False
        msg_id = message_id(job_id, key) if key else f"msg_{uuid.uuid4().hex}"
        keyed = {"key": key} if key else {}
        payload = {"type": f"job.{event_type}", "timestamp": time.time(), "data": {"id": job_id, **data}}
        body = json.dumps(payload, separators=(",", ":")).encode()
        for attempt in range(1, self.attempts + 1):
            outcome: dict[str, Any] = {"message_id": msg_id, "event": event_type, "attempt": attempt, **keyed}
            try:
                # Checked again at every attempt: the name may resolve elsewhere now.
                target = check_target(hook["url"], allow_private=self.allow_private, resolve=self.resolve)
                ts = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(ts),
                    "webhook-signature": sign(hook["secret"], msg_id, ts, body),
                }
                status = post(target, headers, body, self.timeout_s)
                outcome["status_code"] = status
            except WebhookTargetRefused as e:
                self.store.event(job_id, "webhook_failed", **outcome, error=str(e), final=True)
                return False
            except OSError as e:
                status = 0
                outcome["error"] = f"{type(e).__name__}: {e}"
            self.store.event(job_id, "webhook_attempt", **outcome)
            if 200 <= status < 300:
                self.store.event(
                    job_id, "webhook_delivered", message_id=msg_id, event=event_type, attempts=attempt, **keyed
                )
                return True
            if 400 <= status < 500 and status not in (408, 429):
                break
            if attempt < self.attempts:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
        self.store.event(
            job_id, "webhook_failed", message_id=msg_id, event=event_type, attempts=attempt, final=True, **keyed
        )
        return False
