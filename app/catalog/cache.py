"""A local read-through cache of compacted catalog files kept on object storage.

A compacted file is never rewritten under its name (the name is a hash of its inputs; a later
compaction deletes it and writes another), so once fetched it can be read from local disk by every
later query instead of with several ranged GETs per file per query. Batch files (small, still
changing) and the listing itself are still read from the store on each query, so new runs are seen.

- Key: the object's path, its size and its modification time from the listing. A replaced object
  (another upload under the same key) has another size or time, so it is fetched again; the old
  copy ages out.
- Integrity: a file is fetched whole in one GET, written under a temporary name in the cache
  folder, checked (the byte count is the listed size, the Parquet magic ends it), then renamed
  into place: a reader of the cache sees a whole checked file or nothing, from any number of
  processes at once. On use its size is checked again; a file that fails is deleted and fetched.
- Bound: `IMAGEFAB_CATALOG_CACHE_BYTES` (default 10 GiB; 0 turns the cache off). After a fetch,
  the least recently used files (by access time, touched on use) are deleted until the cache is
  under the bound.
- Where: `IMAGEFAB_CATALOG_CACHE` if set, else `$IMAGEFAB_HOME/catalog-cache`, else
  `~/.cache/imagefab/catalog-cache`. Local catalogs are never cached.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

DEFAULT_BYTES = 10 * 1024**3
CHUNK = 8 * 1024 * 1024
FETCHERS = 8  # objects fetched at once on a cold cache
_ENV_DIR = "IMAGEFAB_CATALOG_CACHE"
_ENV_BYTES = "IMAGEFAB_CATALOG_CACHE_BYTES"


def cache_dir() -> Path:
    if os.environ.get(_ENV_DIR):
        return Path(os.environ[_ENV_DIR]).expanduser()
    home = os.environ.get("IMAGEFAB_HOME") or Path.home() / ".cache" / "imagefab"
    return Path(home) / "catalog-cache"


def cache_bytes() -> int:
    raw = os.environ.get(_ENV_BYTES)
    if raw is None or raw == "":
        return DEFAULT_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{_ENV_BYTES}={raw!r}: not a number of bytes") from None
    if value < 0:
        raise ValueError(f"{_ENV_BYTES}={raw!r}: must be 0 (off) or a positive number of bytes")
    return value


@dataclass
class CacheStats:
    hits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    rejected: int = 0  # cached files found damaged and fetched again
    evicted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


STATS = CacheStats()


def _entry(root: Path, fs: pafs.FileSystem, path: str, size: int, mtime_ns: int) -> Path:
    """Where `path` (as listed: size, mtime) is cached: the store's partition folders are kept
    (readers take `date` and `run_id` from them), under a folder per store and a name per version."""
    folder, name = path.rsplit("/", 1)
    version = hashlib.sha256(f"{fs.type_name}\n{path}\n{size}\n{mtime_ns}".encode()).hexdigest()[:16]
    return root / _store_folder(fs, folder) / f"{name.removesuffix('.parquet')}.{version}.parquet"


def _store_folder(fs: pafs.FileSystem, folder: str) -> str:
    """The partition folders (`date=…/run_id=…`) below a per-store hash of what lies above them."""
    parts = folder.split("/")
    i = next((k for k, p in enumerate(parts) if p.startswith("date=")), len(parts))
    top = hashlib.sha256(f"{fs.type_name}\n{'/'.join(parts[:i])}".encode()).hexdigest()[:16]
    return "/".join([top, *parts[i:]])


def partition_base(fs: pafs.FileSystem, base: str) -> str:
    """The cache folder standing for a catalog's base folder (for hive partitioning of cached files)."""
    return str(cache_dir() / _store_folder(fs, base))


def _valid(local: Path, size: int) -> bool:
    try:
        if local.stat().st_size != size:
            return False
        with open(local, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def local_copy(fs: pafs.FileSystem, path: str, size: int, mtime_ns: int) -> str | None:
    """A local path holding the object `path` (size and mtime as listed), fetched on first use;
    None when the cache is off."""
    limit = cache_bytes()
    if limit == 0:
        return None
    root = cache_dir()
    local = _entry(root, fs, path, size, mtime_ns)
    if local.exists():
        if _valid(local, size):
            os.utime(local)  # recently used
            with STATS.lock:
                STATS.hits += 1
            return str(local)
        with STATS.lock:
            STATS.rejected += 1
        local.unlink(missing_ok=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        if not _valid(tmp, size):
            raise OSError(f"{path}: fetched {tmp.stat().st_size} bytes, listed {size} (changed while read?)")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    with STATS.lock:
        STATS.fetches += 1
        STATS.fetched_bytes += size
    return str(local)


def local_copies(fs: pafs.FileSystem, files: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Local paths of the objects {path: (size, mtime_ns)}, fetching the missing ones (several
    at once: one GET each), then keeping the cache under its bound; {} when the cache is off."""
    limit = cache_bytes()
    if limit == 0 or not files:
        return {}
    with ThreadPoolExecutor(max_workers=FETCHERS) as pool:
        got = dict(zip(files, pool.map(lambda p: local_copy(fs, p, *files[p]), files)))
    out = {p: v for p, v in got.items() if v is not None}
    if STATS.fetches != _evicted_at[0]:
        _evicted_at[0] = STATS.fetches
        evict(limit, keep={Path(v) for v in out.values()})
    return out


_evicted_at = [0]


def evict(limit: int, keep: set[Path] | frozenset[Path] = frozenset()) -> int:
    """Delete the least recently used cached files until the cache holds at most `limit` bytes."""
    root = cache_dir()
    files = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n.endswith(".parquet"):
                p = Path(dirpath) / n
                try:
                    st = p.stat()
                except OSError:
                    continue
                files.append((max(st.st_atime, st.st_mtime), st.st_size, p))
    total = sum(s for _, s, _ in files)
    gone = 0
    for _, s, p in sorted(files):
        if total <= limit:
            break
        if p in keep:
            continue
        p.unlink(missing_ok=True)
        total -= s
        gone += 1
    with STATS.lock:
        STATS.evicted += gone
    return gone
