"""Write game_assets.parquet: the asset prompts of specs/game_assets.yaml.

    .venv/bin/python specs/data/make_game_assets.py

A Parquet input carries the prompt itself (no template). The styles are not in the data: the spec
renders every row through each of its combinations (an A/B test), with the same seeds.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ASSETS = {
    "sword": "isometric fantasy sword game asset, centered, clean background",
}


def build() -> pa.Table:
    return pa.table({
        "asset_id": list(ASSETS),
        "prompt": list(ASSETS.values()),
        "category": ["weapon"] * len(ASSETS),
    })


if __name__ == "__main__":
    out = Path(__file__).with_name("game_assets.parquet")
    pq.write_table(build(), out)
    print(f"wrote {out} ({len(ASSETS)} rows)")
