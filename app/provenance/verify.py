"""What a file says about where it came from: C2PA manifest, invisible watermark, infotext."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.metadata import read_metadata
from app.provenance import watermark
from app.provenance.signing import read_manifest

# payload (12 hex) -> catalog rows whose image_id starts with it
CatalogLookup = Callable[[str], list[dict[str, Any]]]


def verify_bytes(
    data: bytes,
    file: str,
    *,
    trust_anchors: bytes | None = None,
    lookup: CatalogLookup | None = None,
) -> dict[str, Any]:
    """One file's provenance: {"file", "format", "c2pa", "watermark", "infotext", "summary"}.

    `c2pa`: None when the file carries no manifest, else `read_manifest`'s dict. `watermark`: None
    when none is found, else {"payload", "sync_errors", "method", "catalog": [rows]}. `infotext`:
    A1111's parameters text, or None.
    """
    try:
        metadata = read_metadata(data)
    except ValueError as e:
        return {"file": file, "format": None, "c2pa": None, "watermark": None, "infotext": None, "error": str(e),
                "summary": [f"not a readable PNG, JPEG or WebP file: {e}"]}  # fmt: skip
    fmt = str(metadata["format"]).lower()
    manifest = read_manifest(data, fmt, trust_anchors)

    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    reading = watermark.detect(rgb)
    mark: dict[str, Any] | None = None
    if reading is not None:
        mark = {**reading.to_dict(), "catalog": lookup(reading.payload) if lookup else None}

    return {
        "file": file,
        "format": fmt,
        "c2pa": manifest,
        "watermark": mark,
        "infotext": metadata.get("parameters"),
        "summary": _summary(manifest, mark, metadata.get("parameters")),
    }


def verify_file(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    return verify_bytes(Path(path).read_bytes(), str(path), **kwargs)


def _summary(manifest: dict[str, Any] | None, mark: dict[str, Any] | None, infotext: str | None) -> list[str]:
    lines = []
    if manifest is None:
        lines.append("C2PA: no manifest (never signed, or stripped when the file was re-saved)")
    elif manifest["valid"]:
        trust = "trusted signer" if manifest["trusted"] else "signer not in the trust anchors"
        actions = ", ".join(a["action"] for a in manifest["claims"].get("actions", []))
        lines.append(f"C2PA: valid signature and hash binding ({trust}: {manifest.get('signer')}); actions: {actions}")
    else:
        lines.append(f"C2PA: INVALID ({', '.join(manifest['failures'])})")
    if mark is None:
        lines.append("watermark: none found")
    else:
        rows = mark.get("catalog")
        where = (
            ""
            if rows is None
            else (
                f" -> {len(rows)} catalog row(s): {', '.join(r['image_id'] for r in rows)}"
                if rows
                else " -> no catalog row"
            )
        )
        lines.append(f"watermark: image id prefix {mark['payload']}{where}")
    lines.append("infotext: present" if infotext else "infotext: none")
    return lines
