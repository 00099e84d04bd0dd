"""Image URLs that work without the API key: signed with a server secret, and expiring.

    /v1/files/images/<image_id>.<png|jpeg|webp>?expires=<unix s>&sig=<hex>[&quality=<1..100>]

`sig` is HMAC-SHA256 over the file name, the quality and the expiry, so a URL cannot be pointed at
another image, another encoding or a later time. Every ingress replica must hold the same secret:
it comes from the config (`url_secret`) or `$IMAGEFAB_URL_SECRET`, or else is generated once and
kept in the output store (`serve/url-secret`), which all replicas of a server share.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.storage import OutputStore, StorageError

URL_SECRET_ENV = "IMAGEFAB_URL_SECRET"
SECRET_PATH = "serve/url-secret"


class UrlSignatureError(Exception):
    """A signed URL that is expired, altered or malformed."""


@dataclass(frozen=True)
class UrlSigner:
    secret: bytes
    ttl_s: int

    def _mac(self, name: str, quality: int | None, expires: int) -> str:
        message = f"{name}\n{quality if quality is not None else ''}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def query(self, name: str, now: float, quality: int | None = None) -> str:
        """The query string that makes `/v1/files/images/<name>` readable until now + ttl."""
        expires = int(now) + self.ttl_s
        q = f"&quality={quality}" if quality is not None else ""
        return f"expires={expires}{q}&sig={self._mac(name, quality, expires)}"

    def check(self, name: str, expires: str | None, sig: str | None, quality: int | None, now: float) -> None:
        """Raise `UrlSignatureError` unless `sig` signs (name, quality, expires) and it has not passed."""
        if not expires or not sig:
            raise UrlSignatureError("a signed image URL needs both `expires` and `sig`")
        try:
            when = int(expires)
        except ValueError:
            raise UrlSignatureError(f"`expires` is not a Unix time: {expires[:32]!r}") from None
        # Compare first and in constant time: an altered URL learns nothing from the answer's timing.
        if not hmac.compare_digest(self._mac(name, quality, when).encode(), sig.encode()):
            raise UrlSignatureError("the URL's signature does not match (altered, or signed by another server)")
        if when < now:
            raise UrlSignatureError(f"the URL expired {int(now - when)} s ago; ask for the image again")


def url_secret(store: OutputStore, configured: str | None = None) -> bytes:
    """The configured secret, else the one kept in the output store (made there on first use)."""
    configured = configured or os.environ.get(URL_SECRET_ENV) or None
    if configured:
        return configured.encode()
    try:
        return store.read_bytes(SECRET_PATH).strip()
    except StorageError:
        pass
    store.write_bytes(SECRET_PATH, secrets.token_hex(32).encode())
    if store.is_local:
        with contextlib.suppress(OSError):
            Path(store.path(SECRET_PATH)).chmod(0o600)
    # Read back rather than keep what was written: if two servers started at once, both use the
    # file that won.
    return store.read_bytes(SECRET_PATH).strip()
