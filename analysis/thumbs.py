"""Small images of catalogued renders, for the report and the review page.

Paths are rebuilt from image_id with the output layout (images/<id[:2]>/<id>.png and
images/<id[:2]>/<id>/<preset>.<ext>), so an output folder that was moved still works.
"""

from __future__ import annotations

import io

from PIL import Image

from app.storage import OutputStore, StorageError


def _rel_paths(row: dict) -> list[str]:
    """Where a row's pictures are, smallest first: its `thumbnail` variant, then the master."""
    image_id = row["image_id"]
    shard = f"images/{image_id[:2]}/{image_id}"
    rels = [
        f"{shard}/{v['uri'].rsplit('/', 1)[-1]}"
        for v in (row.get("variants") or [])
        if v.get("preset") == "thumbnail" and v.get("uri")
    ]
    if row.get("uri"):
        rels.append(f"{shard}.png")
    return rels


def thumbnail(output: OutputStore, row: dict, size: int = 160, quality: int = 80) -> bytes | None:
    """A WebP at most `size` pixels on a side, or None when the row has no readable image."""
    for rel in _rel_paths(row):
        try:
            data = output.read_bytes(rel)
        except StorageError:
            continue
        try:
            with Image.open(io.BytesIO(data)) as opened:
                im = opened.convert("RGB")
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="WEBP", quality=quality)
                return buf.getvalue()
        except OSError:
            continue
    return None
