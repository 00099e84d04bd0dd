"""A small real output for the analysis and review tests: catalog rows through CatalogStore, real
PNG masters and WebP thumbnails through OutputStore, in the layout a bulk job writes.

The rows are few and hand-written so tests can state the expected numbers outright:

  run shop-a (2026-11-01, H100): 6 product images of template `studio` with LoRA style v1,
      4 accepted, 1 review (borderline_blur), 1 rejected (blur); plus P-9 failing with an OOM
  run shop-b (2026-12-03, H100): P-9 rendered again (accepted: the rerun's row wins), 1 review,
      1 rejected (low_contrast), 1 bad row (failed, no image), template `lifestyle` with LoRAs
      style v1 @0.8 + detail v2 @0.5
  run game-c (2026-12-03, CPU): 2 accepted without a template, no LoRA
"""

from __future__ import annotations

import argparse
import io
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from app.catalog.store import CatalogStore
from app.storage import OutputStore

H100 = "cuda:NVIDIA H100 80GB HBM3"
CPU = "cpu:threads=1"
BASE = {"name": "tiny-sdxl", "version": "1", "sha256": "b" * 64, "source": "builtin:tiny-sdxl"}
STYLE = {"name": "style", "version": "1", "weight": 0.8, "sha256": "1" * 64, "source": "x"}
DETAIL = {"name": "detail", "version": "2", "weight": 0.5, "sha256": "2" * 64, "source": "x"}
PRODUCTS = {
    "P-1": ("leather ankle boot", "tan", "footwear"),
    "P-2": ("red leather boots", "red", "footwear"),
    "P-3": ("canvas tote bag", "navy", "bags"),
    "P-4": ("ceramic coffee mug", "white", "kitchen"),
    "P-5": ("linen summer shirt", "green", "apparel"),
    "P-6": ("wool scarf", "red", "accessories"),
    "P-7": ("steel bottle", "silver", "outdoor"),
    "P-8": ("glass vase", "clear", "home"),
    "P-9": ("suede loafer", "brown", "footwear"),
}


def image_id(n: int) -> str:
    return f"{n:02x}" + "%030x" % (n * 7919)


# (id number, run, product, template, loras, status, reasons, error, accelerator, gpu_s, cpu_s, sharpness)
ROWS = [
    (1, "a", "P-1", "studio", [STYLE], "accepted", [], "", H100, 2.0, 0.5, 400.0),
    (2, "a", "P-2", "studio", [STYLE], "accepted", [], "", H100, 2.0, 0.5, 380.0),
    (3, "a", "P-3", "studio", [STYLE], "accepted", [], "", H100, 2.0, 0.5, 360.0),
    (4, "a", "P-4", "studio", [STYLE], "accepted", [], "", H100, 2.0, 0.5, 340.0),
    (5, "a", "P-5", "studio", [STYLE], "review", ["borderline_blur"], "", H100, 2.0, 0.5, 90.0),
    (6, "a", "P-6", "studio", [STYLE], "rejected", ["blur"], "", H100, 2.0, 0.5, 20.0),
    (9, "a", "P-9", "studio", [STYLE], "failed", [], "generate_error: CUDA out of memory", H100, 0.0, 0.0, None),
    (9, "b", "P-9", "studio", [STYLE], "accepted", [], "", H100, 2.0, 0.5, 300.0),
    (7, "b", "P-7", "lifestyle", [STYLE, DETAIL], "review", ["borderline_low_contrast"], "", H100, 3.0, 0.5, 250.0),
    (8, "b", "P-8", "lifestyle", [STYLE, DETAIL], "rejected", ["low_contrast"], "", H100, 3.0, 0.5, 240.0),
    (
        10,
        "b",
        "P-1",
        "lifestyle",
        [STYLE, DETAIL],
        "failed",
        [],
        "bad_row: template column 'color' is empty",
        "",
        0.0,
        0.0,
        None,
    ),
    (11, "c", None, None, [], "accepted", [], "", CPU, 10.0, 1.0, 500.0),
    (12, "c", None, None, [], "accepted", [], "", CPU, 10.0, 1.0, 510.0),
]
RUNS = {
    "a": ("shop-20261101-090000-aaaa", "2026-11-01", datetime(2026, 11, 1, 9, 0, tzinfo=UTC)),
    "b": ("shop-20261203-100000-bbbb", "2026-12-03", datetime(2026, 12, 3, 10, 0, tzinfo=UTC)),
    "c": ("game-20261203-110000-cccc", "2026-12-03", datetime(2026, 12, 3, 11, 0, tzinfo=UTC)),
}
TEMPLATES = {"studio": "studio photo of a {product_name}, {color}", "lifestyle": "{product_name} in use, {color}"}


def _png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _webp(png: bytes, size: int = 32) -> bytes:
    im = Image.open(io.BytesIO(png)).resize((size, size))
    buf = io.BytesIO()
    im.save(buf, format="WEBP", quality=80)
    return buf.getvalue()


def make_output(uri: str, prices=None) -> OutputStore:
    from app.cost import PriceTable

    prices = prices or PriceTable()
    output = OutputStore.at(uri)
    store = CatalogStore(output)
    for run in ("a", "b", "c"):
        run_id, day, start = RUNS[run]
        rows = []
        for k, (n, r, product, template, loras, status, reasons, error, acc, gpu_s, cpu_s, sharp) in enumerate(ROWS):
            if r != run:
                continue
            iid = image_id(n)
            created = start.replace(minute=k)
            variables, tags = {}, {}
            if product:
                name, color, category = PRODUCTS[product]
                variables = {"product_name": name, "color": color}
                tags = {"product_id": product, "sku": "SKU-" + product[2:], "category": category, "campaign": "autumn"}
                prompt = TEMPLATES[template].format(**variables)
            else:
                tags = {"asset_id": f"sword-{n}", "style": "painted"}
                prompt = "a glowing sword, game asset, painted"
            uri, variants = "", []
            if status != "failed":
                png = _png(n)
                uri = output.write_bytes(f"images/{iid[:2]}/{iid}.png", png)
                if status in ("accepted", "review"):
                    thumb = _webp(png)
                    variants = [
                        {
                            "preset": "thumbnail",
                            "uri": output.write_bytes(f"images/{iid[:2]}/{iid}/thumbnail.webp", thumb),
                            "width": 32,
                            "height": 32,
                            "format": "webp",
                            "bytes": len(thumb),
                        }
                    ]
            rows.append(
                {
                    "image_id": iid,
                    "source": "bulk",
                    "created_at": created,
                    "status": status,
                    "reasons": reasons,
                    "error": error,
                    "prompt": prompt,
                    "negative_prompt": "text, watermark, blurry",
                    "template": {"name": template, "version": "v1-" + template[:3], "text": TEMPLATES[template]}
                    if template
                    else None,
                    "variables": variables,
                    "tags": tags,
                    "row_key": product or f"sword-{n}",
                    "variation": 0,
                    "base_model": BASE,
                    "loras": loras,
                    "scheduler": "euler",
                    "steps": 4,
                    "guidance": 5.0,
                    "width": 64,
                    "height": 64,
                    "seed": n,
                    "tier": "default",
                    "batch_id": iid,
                    "batch_size": 1,
                    "sharpness": sharp,
                    "contrast": 0.2 if sharp else None,
                    "exposure": 0.01 if sharp else None,
                    "uri": uri,
                    "variants": variants,
                    "gpu_seconds": gpu_s,
                    "cpu_seconds": cpu_s,
                    "cost_usd": prices.image_cost(acc, gpu_s, cpu_s) if acc else 0.0,
                    "accelerator": acc,
                }
            )
        store.append(rows, run_id=run_id, date=day)
    return output


def cli(*argv: str) -> int:
    """`imagefab …` for the analysis and review commands, as app/cli.py registers them."""
    from analysis.cli import add_analysis_cli, add_review_cli

    parser = argparse.ArgumentParser(prog="imagefab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_analysis_cli(sub)
    add_review_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)
