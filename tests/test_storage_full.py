"""A full output store, without Ray: a write that finds no space is a `StorageFull` that leaves no
temporary file, "full" is told apart from other failures, and the Serve reserve
(`limits.min_free_bytes`) reads the real disk. tests/test_serve_failures.py fills a real disk under
a running server."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.serve.config import load_serve_config
from app.serve.core import ServeCore, resolve_serve_models
from app.storage import OutputStore, StorageError, StorageFull, is_storage_full

REPO = Path(__file__).resolve().parents[1]
MOUNT_AND_RUN = 'mount -t tmpfs -o size=64k t "$0" && exec "$1" -c "$2"'  # $0 the folder, $1 python, $2 its script


def test_a_write_to_a_full_disk_is_storage_full_and_leaves_no_temporary_file(tmp_path):
    """On a real 64 KiB filesystem, mounted in a mount namespace of its own (`unshare`), so no
    privilege beyond what unprivileged user namespaces give is needed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(
        f"""
        import json, os
        from app.storage import OutputStore, StorageFull
        store = OutputStore.at({str(disk)!r})
        store.write_bytes("images/small.bin", b"x" * 1000)
        try:
            store.write_bytes("images/large.bin", b"x" * 200_000)
            answer = {{"raised": None}}
        except StorageFull as e:
            answer = {{"raised": "StorageFull", "message": str(e), "errno": e.__cause__.errno}}
        answer["files"] = sorted(os.path.relpath(os.path.join(d, f), {str(disk)!r})
                                 for d, _, fs in os.walk({str(disk)!r}) for f in fs)
        print(json.dumps(answer))
        """
    )
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) here to hold a small filesystem")
    done = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", MOUNT_AND_RUN, str(disk), sys.executable, script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    if done.returncode and "Traceback" not in done.stderr:  # no namespace or mount: the script never ran
        pytest.skip(f"no mount namespace here to hold a small filesystem ({done.stderr.strip()[:200]})")
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["raised"] == "StorageFull" and answer["errno"] == errno.ENOSPC
    assert answer["message"] == f"{disk}/images/large.bin: cannot write (No space left on device)"
    assert answer["files"] == ["images/small.bin"]  # the temporary file of the failed write is gone


def test_full_is_told_apart_from_other_storage_failures():
    full = OSError(errno.ENOSPC, "No space left on device")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    denied = OSError(errno.EACCES, "Permission denied")
    for cause, expected in ((full, True), (quota, True), (denied, False)):
        try:  # as a writer that wraps the OSError itself (the job store's create-if-absent does)
            raise StorageError(f"out/x: cannot write ({cause.strerror})") from cause
        except StorageError as e:
            assert is_storage_full(e) is expected
    assert is_storage_full(StorageFull("out: below the reserve"))


def test_free_bytes_reads_the_stores_disk(tmp_path):
    store = OutputStore.at(str(tmp_path / "not" / "made" / "yet"))
    free = store.free_bytes()
    assert free is not None and abs(free - shutil.disk_usage(tmp_path).free) < 1 << 30
    assert OutputStore.at("s3://bucket/prefix").free_bytes() is None  # an object store has no such limit


def test_the_serve_reserve_refuses_below_it(tmp_path, model_catalog):
    def core(reserve: int) -> ServeCore:
        config = load_serve_config(None, output_uri=str(tmp_path / "out"), limits={"min_free_bytes": reserve})
        return ServeCore(config, resolve_serve_models(config))

    total = shutil.disk_usage(tmp_path).total
    with pytest.raises(StorageFull) as refused:
        core(total + 1).check_space()  # more than the whole disk: always below it
    assert str(refused.value).startswith(f"{tmp_path / 'out'}: ")
    assert f"below this server's reserve of {total + 1} (limits.min_free_bytes)" in str(refused.value)
    core(0).check_space()  # no reserve
    core(1 << 20).check_space()
