"""Provenance and safety, measured: watermark robustness and cost, C2PA signing cost, NSFW false alarms.

    python -m benchmarks.provenance_eval [--size 1024] [--tiny 16] [--json benchmarks/runs/provenance.json]

1. Watermark (app/provenance/watermark.py) on scikit-image's photographs at `--size`² and on
   `--tiny` renders of the offline tiny model (256², the demo's size): is the payload read back
   exactly, untouched and after JPEG q70, a resize to 0.5, a 10 % crop (5 % off each side) and a
   screenshot-like re-encode (4:2:0 JPEG q85 through OpenCV after a one-level brightness shift),
   plus a screenshot at 125 % display scale; and the PSNR the mark costs. False detections on the
   unmarked photographs.
2. NSFW scores (NudeNet) of every photograph: how many would cross 0.3 / 0.5 / 0.6.
3. CPU seconds per image (process time, one thread): watermark embed and detect, NSFW score,
   C2PA signing of a master PNG and of a JPEG variant that embeds its master as an ingredient,
   prompt screening.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "text",
    "retina",
    "brick",
    "grass",
    "gravel",
    "cat",
)


def photo(name: str, side: int) -> np.ndarray:
    from skimage import data as skdata

    pixels = getattr(skdata, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.asarray(Image.fromarray(pixels[:, :, :3]).resize((side, side), Image.Resampling.LANCZOS))


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _resize(rgb: np.ndarray, scale: float, method=Image.Resampling.LANCZOS) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), method))


def _crop10(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    dy, dx = round(0.05 * h), round(0.05 * w)
    return np.ascontiguousarray(rgb[dy : h - dy, dx : w - dx])


def _screenshot(rgb: np.ndarray) -> np.ndarray:
    import cv2

    shifted = np.clip(rgb.astype(np.int16) + 1, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(
        ".jpg", shifted[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, 0x221111]
    )
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:
        raise RuntimeError("OpenCV could not re-encode the image as JPEG")
    return np.ascontiguousarray(decoded[:, :, ::-1])


ATTACKS = {
    "none": lambda x: x,
    "jpeg_q70": lambda x: _jpeg(x, 70),
    "resize_0.5": lambda x: _resize(x, 0.5),
    "crop_10pct": _crop10,
    "screenshot_reencode": _screenshot,
    "screenshot_125pct": lambda x: _resize(x, 1.25, Image.Resampling.BILINEAR),
}


def tiny_renders(count: int) -> list[tuple[str, np.ndarray]]:
    """`count` renders of the offline tiny SDXL at 256² (the demo's model and size)."""
    import pyarrow as pa

    from app.expand import ExpandRows, ResolvedModels
    from app.generator import Generator
    from app.models.catalog import ModelCatalog
    from app.request import RenderRequest
    from app.spec import ComputeSpec, parse_spec

    catalog = ModelCatalog.load()
    base = catalog.resolve_base("tiny-sdxl")
    models = ResolvedModels.single(base, loras={}, known_loras=())
    spec = parse_spec(
        {"run_name": "wm", "input": {"path": "/x.parquet"}, "size": "tiny-square", "steps": 4,
         "variations": {"seeds_per_row": count, "seed_mode": "fixed", "base_seed": 11}}
    )  # fmt: skip
    out = ExpandRows(spec, models)(pa.Table.from_pylist([{"prompt": "studio photo of a leather bag"}]))
    requests = [RenderRequest.from_json(r) for r in out["request"]]
    generator = Generator(base, {}, ComputeSpec(device="cpu", cpu_threads=1, batch_size=4))
    return [(r.image_id, r.pixels) for r in generator.render(requests) if r.pixels is not None]


def watermark_rows(images: list[tuple[str, np.ndarray]]) -> dict:
    from app.provenance import watermark

    recovered = {name: 0 for name in ATTACKS}
    psnrs, embed_s, detect_s, false_hits = [], [], [], 0
    for image_id, rgb in images:
        false_hits += watermark.detect(rgb) is not None
        t0 = time.process_time()
        marked = watermark.embed(np.array(rgb), image_id)
        embed_s.append(time.process_time() - t0)
        mse = np.mean((marked.astype(np.float64) - rgb) ** 2)
        psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255**2 / mse))
        for name, attack in ATTACKS.items():
            t0 = time.process_time()
            reading = watermark.detect(attack(marked))
            if name == "none":
                detect_s.append(time.process_time() - t0)
            recovered[name] += reading is not None and reading.payload == image_id[:12]
    n = len(images)
    return {
        "images": n,
        "recovered": {name: round(count / n, 3) for name, count in recovered.items()},
        "false_detections_unmarked": false_hits,
        "psnr_db": {"median": round(statistics.median(psnrs), 2), "min": round(min(psnrs), 2)},
        "embed_cpu_s": round(statistics.median(embed_s), 4),
        "detect_cpu_s": round(statistics.median(detect_s), 4),
    }


def nsfw_rows(side: int) -> dict:
    from app.provenance.screening import NsfwClassifier

    classifier = NsfwClassifier(threads=1)
    scores, times = {}, []
    for name in PHOTOS:
        rgb = photo(name, side)
        t0 = time.process_time()
        scores[name] = round(classifier.score(rgb).score, 3)
        times.append(time.process_time() - t0)
    return {
        "scores": scores,
        "above": {str(t): sum(s >= t for s in scores.values()) for t in (0.3, 0.5, 0.6)},
        "photos": len(scores),
        "cpu_s": round(statistics.median(times), 4),
    }


def signing_rows(side: int) -> dict:
    from app.postprocess import encode_image
    from app.provenance.devca import ensure_dev_credentials
    from app.provenance.screening import PromptScreen
    from app.provenance.signing import (
        GenerationRecord,
        Ingredient,
        ModelRecord,
        load_signer,
        read_manifest,
        sign_master,
        sign_variant,
    )

    with tempfile.TemporaryDirectory() as home:
        creds = ensure_dev_credentials(home)
        signer = load_signer(creds.chain, creds.key)
        master_s, variant_s, grow_master, grow_variant = [], [], [], []
        for name in PHOTOS[:6]:
            image_id = hashlib.sha256(name.encode()).hexdigest()
            rgb = photo(name, side)
            data = encode_image(Image.fromarray(rgb), "png")
            record = GenerationRecord(
                image_id, "bench", ModelRecord("sdxl-base", "0" * 64), watermark_payload=image_id[:12]
            )
            t0 = time.process_time()
            signed = sign_master(data, "png", record, signer, f"{image_id}.png")
            master_s.append(time.process_time() - t0)
            grow_master.append(len(signed) - len(data))
            variant = encode_image(Image.fromarray(_resize(rgb, 0.5)), "jpeg")
            t0 = time.process_time()
            signed_variant = sign_variant(
                variant, "jpeg", Ingredient(f"{image_id}.png", signed, "png"), signer,
                image_id=image_id, generator_version="bench", title="v.jpg", watermarked=False,
                watermark_payload=image_id[:12],
            )  # fmt: skip
            variant_s.append(time.process_time() - t0)
            grow_variant.append(len(signed_variant) - len(variant))
            manifest = read_manifest(signed_variant, "jpeg", creds.root_ca.read_bytes())
            if manifest is None or not manifest["trusted"]:
                raise RuntimeError(f"the signed variant does not verify: {manifest}")
    screen = PromptScreen()
    prompt = "studio photo of a leather bag, brown, soft light, white background, Scunthorpe edition"
    t0 = time.process_time()
    for _ in range(1000):
        screen.reason(prompt)
    return {
        "sign_master_png_cpu_s": round(statistics.median(master_s), 4),
        "sign_variant_jpeg_cpu_s": round(statistics.median(variant_s), 4),
        "master_bytes_added": int(statistics.median(grow_master)),
        "variant_bytes_added": int(statistics.median(grow_variant)),
        "prompt_screen_cpu_us": round((time.process_time() - t0) / 1000 * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tiny", type=int, default=16, help="tiny-model renders to watermark (0: none)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    packages = ("c2pa-python", "invisible-watermark", "nudenet", "onnxruntime", "opencv-python-headless", "numpy")
    results: dict = {"versions": {name: version(name) for name in packages}}
    photos = [(hashlib.sha256(n.encode()).hexdigest(), photo(n, args.size)) for n in PHOTOS]
    results["watermark_photos"] = watermark_rows(photos)
    print("watermark, photos:", json.dumps(results["watermark_photos"]), flush=True)
    if args.tiny:
        results["watermark_tiny"] = watermark_rows(tiny_renders(args.tiny))
        print("watermark, tiny renders:", json.dumps(results["watermark_tiny"]), flush=True)
    results["nsfw"] = nsfw_rows(args.size)
    print("nsfw:", json.dumps(results["nsfw"]), flush=True)
    results["signing"] = signing_rows(args.size)
    print("signing:", json.dumps(results["signing"]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
