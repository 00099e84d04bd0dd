"""Where outputs go: a local folder or any pyarrow filesystem URI (s3://bucket/prefix, gs://…).

Writes are atomic for readers: on a local disk a file is written under a temporary name and
renamed into place; object stores publish an object only when its upload completes.

Object-store settings come from the environment of the process that opens the store (the driver
and every Ray worker), as the cloud SDKs read them: for S3 `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (or an instance role / IRSA), `AWS_REGION`, and `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for an S3-compatible server such as MinIO. Credentials never appear in a
URI, so never in the catalog. A URI may also carry pyarrow's non-secret options as a query
(`s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`): they are used to open the
filesystem and kept out of every location the store hands out (`uri`, `uri_of`).

A full disk (ENOSPC, or a quota's EDQUOT) is a `StorageFull`: the temporary file is removed, so
nothing half-written is ever renamed into place, and callers can tell "no space" from other
failures (the Serve app answers 507 for it). `free_bytes` tells how much room a local store has,
for servers that keep a reserve free (`limits.min_free_bytes` in app/serve/config.py).

An object store that stops answering (a network cut, a restarting server, 503 Slow Down) is waited
for: a read, write or listing that fails that way is tried again with growing pauses for up to
`outage_wait_s` (the bulk job's `output.outage_wait_s`, 60 s by default), so a short outage only
pauses the job. Past it the error names the location and how long it was waited for. Errors that
retrying cannot cure (no such bucket, access denied, a full local disk) are raised at once. A store
opened without a wait (the Serve app's) fails after the S3 client's own few retries.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

# How an S3 client (the AWS SDK under pyarrow) words a failure that may pass: no connection,
# a timeout, a 5xx or throttling. Anything else (NO_SUCH_BUCKET, ACCESS_DENIED, …) is final.
TRANSIENT_MARKS = (
    "NETWORK_CONNECTION",
    "REQUEST_TIMEOUT",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "INTERNAL_FAILURE",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
)
DEFAULT_OUTAGE_WAIT_S = 60.0  # the bulk job's default (app/spec.py OutputSpec)
T = TypeVar("T")


class StorageError(OSError):
    """The output location cannot be written or read; the message names it."""


class StorageFull(StorageError):
    """The output location has no space left (a full disk or quota, or below a server's reserve)."""


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_storage_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the storage is out of space."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, StorageFull) or (isinstance(seen, OSError) and seen.errno in FULL_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_transient(error: BaseException) -> bool:
    """Whether an object store's error may pass by itself (see TRANSIENT_MARKS)."""
    text = str(error)
    return any(mark in text for mark in TRANSIENT_MARKS)


def is_uri(location: str) -> bool:
    """Whether `location` is a URI (`s3://…`, `file://…`) rather than a local path."""
    return "://" in location


@dataclass(frozen=True)
class OutputStore:
    uri: str  # the location: local paths made absolute, a URI without its query
    fs_options: str = ""  # a URI's query (`endpoint_override=…&scheme=http`), only for opening the filesystem
    outage_wait_s: float = 0.0  # how long an object store that stops answering is waited for (0: not)

    _fs: list = field(default_factory=list, compare=False, repr=False)  # lazily built, not pickled state

    @classmethod
    def at(cls, uri: str, outage_wait_s: float = 0.0) -> OutputStore:
        if not is_uri(uri) or uri.startswith("file://"):
            return cls(str(Path(uri.removeprefix("file://")).expanduser().resolve()))
        # Paths derived from the location must not carry the query inside them
        # (`s3://b/p?scheme=http/images/…`), so it is kept apart.
        location, _, query = uri.partition("?")
        return cls(location, query, outage_wait_s)

    @classmethod
    def of(cls, output: OutputStore | str) -> OutputStore:
        """`output` itself when it is a store, else the store `at` that location."""
        return output if isinstance(output, OutputStore) else cls.at(output)

    def __getstate__(self):
        return {"uri": self.uri, "fs_options": self.fs_options, "outage_wait_s": self.outage_wait_s}

    def __setstate__(self, state):
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "fs_options", state.get("fs_options", ""))
        object.__setattr__(self, "outage_wait_s", state.get("outage_wait_s", 0.0))
        object.__setattr__(self, "_fs", [])

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def fs_and_root(self) -> tuple[pafs.FileSystem, str]:
        if not self._fs:
            if self.is_local:
                self._fs.append((pafs.LocalFileSystem(), self.uri))
            else:
                uri = f"{self.uri}?{self.fs_options}" if self.fs_options else self.uri
                try:
                    self._fs.append(pafs.FileSystem.from_uri(uri))
                except Exception as e:
                    raise StorageError(f"{self.uri}: cannot open output location ({e})") from e
        return self._fs[0]

    def path(self, rel: str) -> str:
        return f"{self.fs_and_root[1].rstrip('/')}/{rel}"

    def uri_of(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    def waiting_out_outages(self, action: Callable[[], T], what: str) -> T:
        """`action()`, tried again while the object store fails in a way that may pass (see
        `is_transient`), for up to `outage_wait_s`; then StorageError naming `what` and the wait.
        A local store, a store without a wait, or an error retrying cannot cure, is raised at once
        (as the OSError it is). Every action given here is idempotent: a write puts the same bytes
        under the same name."""
        deadline = time.monotonic() + self.outage_wait_s
        pause = 0.5
        while True:
            try:
                return action()
            except OSError as e:
                if self.is_local or self.outage_wait_s <= 0 or not is_transient(e):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageError(
                        f"{what}: the object store did not answer for over {self.outage_wait_s:g} s "
                        f"(output.outage_wait_s): {e.strerror or e}"
                    ) from e
                time.sleep(min(pause, left))
                pause = min(pause * 2, 5.0)

    def write_bytes(self, rel: str, data: bytes) -> str:
        fs, _ = self.fs_and_root
        final = self.path(rel)

        def put() -> None:
            with fs.open_output_stream(final) as f:
                f.write(data)

        try:
            if self.is_local:
                Path(final).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(final).with_name(f".{Path(final).name}.{uuid.uuid4().hex[:8]}.tmp")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    tmp.replace(final)
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                self.waiting_out_outages(put, self.uri_of(rel))
        except StorageError:
            raise
        except OSError as e:
            failure = StorageFull if e.errno in FULL_ERRNOS else StorageError
            raise failure(f"{self.uri_of(rel)}: cannot write ({e.strerror or e})") from e
        return self.uri_of(rel)

    def read_bytes(self, rel: str) -> bytes:
        fs, _ = self.fs_and_root

        def get() -> bytes:
            with fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        try:
            return self.waiting_out_outages(get, self.uri_of(rel))
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot read ({e})") from e

    def rel_of(self, uri: str) -> str:
        prefix = self.uri.rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri} is not under the output location {self.uri}")
        return uri[len(prefix) :]

    def free_bytes(self) -> int | None:
        """Bytes free on the disk of a local store (for an unprivileged writer); None for an object
        store, which has no such limit to read. A root not made yet: its nearest existing folder."""
        if not self.is_local:
            return None
        folder = Path(self.uri)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return shutil.disk_usage(folder).free
        except OSError as e:
            raise StorageError(f"{self.uri}: cannot read its free space ({e.strerror or e})") from e

    def check_writable(self) -> None:
        """Fail before any work when the output location cannot take a file."""
        rel = f".imagefab-write-check-{uuid.uuid4().hex[:8]}"
        self.write_bytes(rel, b"ok")
        fs, _ = self.fs_and_root
        with contextlib.suppress(OSError):
            fs.delete_file(self.path(rel))
