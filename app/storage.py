"""Where outputs go: a local folder or any pyarrow filesystem URI (s3://bucket/prefix, gs://…).

Writes are atomic for readers: on a local disk a file is written under a temporary name and
renamed into place; object stores publish an object only when its upload completes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    """The output location cannot be written or read; the message names it."""


def _is_uri(s: str) -> bool:
    return "://" in s


@dataclass(frozen=True)
class OutputStore:
    uri: str  # as given; local paths are made absolute

    _fs: list = field(default_factory=list, compare=False, repr=False)  # lazily built, not pickled state

    @classmethod
    def at(cls, uri: str) -> OutputStore:
        if not _is_uri(uri) or uri.startswith("file://"):
            uri = str(Path(uri.removeprefix("file://")).expanduser().resolve())
        return cls(uri)

    def __getstate__(self):
        return {"uri": self.uri}

    def __setstate__(self, state):
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "_fs", [])

    @property
    def is_local(self) -> bool:
        return not _is_uri(self.uri)

    @property
    def fs_and_root(self) -> tuple[pafs.FileSystem, str]:
        if not self._fs:
            if self.is_local:
                self._fs.append((pafs.LocalFileSystem(), self.uri))
            else:
                try:
                    self._fs.append(pafs.FileSystem.from_uri(self.uri))
                except Exception as e:
                    raise StorageError(f"{self.uri}: cannot open output location ({e})") from e
        return self._fs[0]

    def path(self, rel: str) -> str:
        return f"{self.fs_and_root[1].rstrip('/')}/{rel}"

    def uri_of(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> str:
        fs, _ = self.fs_and_root
        final = self.path(rel)
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
                with fs.open_output_stream(final) as f:
                    f.write(data)
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot write ({e.strerror or e})") from e
        return self.uri_of(rel)

    def read_bytes(self, rel: str) -> bytes:
        fs, _ = self.fs_and_root
        try:
            with fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except OSError as e:
            raise StorageError(f"{self.uri_of(rel)}: cannot read ({e})") from e

    def rel_of(self, uri: str) -> str:
        prefix = self.uri.rstrip("/") + "/"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri} is not under the output location {self.uri}")
        return uri[len(prefix):]

    def check_writable(self) -> None:
        """Fail before any work when the output location cannot take a file."""
        rel = f".imagefab-write-check-{uuid.uuid4().hex[:8]}"
        self.write_bytes(rel, b"ok")
        fs, _ = self.fs_and_root
        try:
            fs.delete_file(self.path(rel))
        except OSError:
            pass
