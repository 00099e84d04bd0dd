"""Write game_assets.parquet: one prompt, three LoRA styles (see specs/game_assets.yaml).

    .venv/bin/python specs/data/make_game_assets.py

A Parquet input carries the prompt itself (no template) and per-row columns that the expansion
reads directly: `loras` replaces the spec's LoRA stack for that row; `style` is copied into tags.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPT = "isometric fantasy sword game asset, centered, clean background"

# style name -> LoRA stack ("name:weight, name:weight"), one row each
STYLES = {
    "painted": "tiny-style:0.8",
    "detailed": "tiny-detail:0.7",
    "blend": "tiny-style:0.5, tiny-detail:0.5",
}


def build() -> pa.Table:
    return pa.table({
        "asset_id": [f"sword-{style}" for style in STYLES],
        "prompt": [PROMPT] * len(STYLES),
        "style": list(STYLES),
        "loras": list(STYLES.values()),
    })


if __name__ == "__main__":
    out = Path(__file__).with_name("game_assets.parquet")
    pq.write_table(build(), out)
    print(f"wrote {out} ({len(STYLES)} rows)")
