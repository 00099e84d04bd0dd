"""Retries for transient faults (tenacity): exponential backoff with jitter, and a server's
`Retry-After` honoured, whichever is longer. Only `BackendError(kind="transient")` is retried."""

from __future__ import annotations

from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx
import tenacity
from tenacity import retry_if_exception, stop_after_attempt, wait_exponential_jitter

from app.backends.base import BackendConfig, BackendError

T = TypeVar("T")


def retry_after_s(headers: httpx.Headers) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import datetime as _dt

    return max(0.0, (when - _dt.datetime.now(_dt.UTC)).total_seconds())


class _WaitRetryAfter(tenacity.wait.wait_base):
    def __init__(self, fallback: tenacity.wait.wait_base, cap_s: float):
        self.fallback = fallback
        self.cap_s = cap_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = self.fallback(retry_state)
        outcome = retry_state.outcome
        err = outcome.exception() if outcome is not None else None
        if isinstance(err, BackendError) and err.retry_after is not None:
            return max(backoff, min(err.retry_after, self.cap_s))
        return backoff


def _transient(e: BaseException) -> bool:
    return isinstance(e, BackendError) and e.kind == "transient"


def with_retries(config: BackendConfig, call: Callable[[], T]) -> T:
    """Run `call`, retrying transient BackendErrors; the last error is raised with `attempts` set."""
    retrying = tenacity.Retrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(config.max_attempts),
        wait=_WaitRetryAfter(
            wait_exponential_jitter(initial=config.backoff_s, max=config.max_backoff_s, jitter=config.backoff_s),
            cap_s=max(config.max_backoff_s, 60.0),
        ),
        reraise=True,
    )
    try:
        return retrying(call)
    except BackendError as e:
        e.attempts = int(retrying.statistics.get("attempt_number", 1))
        raise


def http_error(e: httpx.HTTPError, where: str) -> BackendError:
    """A transport failure (refused connection, timeout, reset) as a transient BackendError."""
    return BackendError("transient", f"{where}: {type(e).__name__}: {e}")


def status_error(response: httpx.Response, reason: str, where: str) -> BackendError:
    """A non-2xx answer in the service's terms; `reason` is the provider's own message."""
    status = response.status_code
    text = f"{where}: HTTP {status}: {reason}"
    if status in (401, 403):
        return BackendError("auth", text, status=status)
    if status == 402:  # out of credits: no retry will help, and nothing more should be submitted
        return BackendError("auth", text, status=status)
    if status == 408 or status == 429 or status >= 500:
        return BackendError("transient", text, retry_after=retry_after_s(response.headers), status=status)
    return BackendError("invalid", text, status=status)
