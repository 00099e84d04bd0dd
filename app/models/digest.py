"""Content digests of model files: what the catalog's sha256 means and how it is checked.

A single file's digest is its sha256. A folder's digest is the sha256 of the lines
"<relative path> <file sha256>\\n" over its files in sorted order, so one changed byte anywhere
changes it, and the per-file digests kept in the manifest name the file that changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "imagefab-manifest.json"
_CHUNK = 1 << 20


class ModelFileError(Exception):
    """A model file is missing, unreadable, not safetensors, or does not match its sha256."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the manifest itself excluded), by relative path."""
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def combine(files: dict[str, str]) -> str:
    lines = "".join(f"{rel} {sha}\n" for rel, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def path_sha256(path: Path) -> str:
    """The digest of a model file or folder (see the module docstring)."""
    if path.is_dir():
        return combine(folder_files(path))
    return file_sha256(path)


def write_manifest(root: Path, extra: dict | None = None) -> str:
    files = folder_files(root)
    digest = combine(files)
    body = {"sha256": digest, "files": files, **(extra or {})}
    (root / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True))
    return digest


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: unreadable manifest ({e})") from e


def verify_folder(root: Path, expected: str) -> None:
    """Raise ModelFileError naming the file whose bytes differ from the manifest, or the folder."""
    if not root.is_dir():
        raise ModelFileError(f"{root}: model folder is missing")
    files = folder_files(root)
    actual = combine(files)
    if actual == expected:
        return
    manifest = read_manifest(root) or {}
    recorded = manifest.get("files", {})
    if manifest.get("sha256") == expected:
        for rel in sorted(set(recorded) | set(files)):
            want, got = recorded.get(rel), files.get(rel)
            if want != got:
                if got is None:
                    raise ModelFileError(f"{root / rel}: file is missing (expected sha256 {want})")
                if want is None:
                    raise ModelFileError(f"{root / rel}: unexpected file (sha256 {got}) in model folder")
                raise ModelFileError(f"{root / rel}: sha256 mismatch: expected {want}, got {got}")
    raise ModelFileError(f"{root}: sha256 mismatch: expected {expected}, got {actual}")


def verify_file(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ModelFileError(f"{path}: model file is missing (expected sha256 {expected})")
    actual = file_sha256(path)
    if actual != expected:
        raise ModelFileError(f"{path}: sha256 mismatch: expected {expected}, got {actual}")
