"""The Serve app's one request error: what the ingress answers with, in each dialect's shape."""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be served: HTTP status, the field at fault and why; `code`, where
    the OpenAI dialect has a code of its own for it (`moderation_blocked`)."""

    def __init__(self, status: int, field: str, message: str, code: str | None = None):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message, self.code = status, field, message, code
