"""The Serve app's one request error: what the ingress answers with, in each dialect's shape."""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be served: HTTP status, the field at fault and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message
