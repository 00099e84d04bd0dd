"""Cost of each QC check per 1024 x 1024 image on one CPU core, and of the duplicate index.

    python -m benchmarks.qc_speed                       # pinned to the first allowed core
    python -m benchmarks.qc_speed --runs 50 --index-sizes 100000 1000000

Prints the median time per image of each measurement, images/s per core for the whole CPU QC
without CLIP and with the shipped tiny CLIP (random weights: its cost is the preprocessing and
a small forward pass), the image embedding of a production architecture built with random
weights (the same arithmetic as the real weights, which cannot be downloaded here), and the
pHash index's build and query times against a full numpy scan.
"""

from __future__ import annotations

import os

# One core: set before numpy / torch start their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

from app.qc import (  # noqa: E402
    PhashIndex,
    QcModels,
    QcSettings,
    check_image,
    checks,
    evaluate_batch,
    perceptual_hash,
)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm caches and lazy imports
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1000


def test_image() -> np.ndarray:
    """scikit-image's astronaut at 1024 x 1024 (LANCZOS): real content, the size SDXL renders."""
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((1024, 1024), Image.Resampling.LANCZOS))


def check_rows(runs: int, batch: int, architectures: list[str]) -> list[tuple[str, float]]:
    import torch

    torch.set_num_threads(1)
    pixels = test_image()
    luma = checks.luminance(pixels)
    cells = checks.cell_grid(pixels)
    settings = QcSettings()
    rows = [
        ("luminance (RGB -> luma)", median_ms(lambda: checks.luminance(pixels), runs)),
        ("sharpness", median_ms(lambda: checks.sharpness(luma), runs)),
        (
            "contrast + exposure + mean",
            median_ms(lambda: (checks.contrast(luma), checks.clipped_shares(luma), checks.mean_luma(luma)), runs),
        ),
        ("cell grid (64 cells, RGB)", median_ms(lambda: checks.cell_grid(pixels), runs)),
        ("color_cast", median_ms(lambda: checks.color_cast(cells), runs)),
        ("black + green block", median_ms(lambda: checks.flat_block_shares(luma, cells), runs)),
        ("blockiness", median_ms(lambda: checks.blockiness(luma), runs)),
        ("banding", median_ms(lambda: checks.banding(pixels, luma), runs)),
        ("all artefacts", median_ms(lambda: checks.artefact_scores(pixels, luma), runs)),
        ("pHash (imagehash)", median_ms(lambda: perceptual_hash(pixels), runs)),
        ("check_image (pixel checks)", median_ms(lambda: check_image(pixels, settings), runs)),
    ]

    # whole CPU QC per image, in batches as a stage sees them
    images = [pixels] * batch
    no_clip = median_ms(lambda: evaluate_batch(images, [None] * batch, settings), max(3, runs // 5)) / batch
    rows.append(("evaluate, no CLIP (+ pHash)", no_clip))

    index = PhashIndex()
    index.add_many(
        [f"i{i}" for i in range(100_000)],
        np.random.default_rng(0).integers(0, 2**64, 100_000, dtype=np.uint64).tolist(),
    )
    counter = iter(range(10**9))
    rows.append(
        (
            "  + duplicate index (100k)",
            median_ms(
                lambda: evaluate_batch(
                    images,
                    [None] * batch,
                    settings,
                    duplicates=index,
                    image_ids=[f"q{next(counter)}" for _ in range(batch)],
                ),
                max(3, runs // 5),
            )
            / batch,
        )
    )

    from app.qc.clip import TINY_MODEL, ClipScorer

    clip = ClipScorer(TINY_MODEL, None, device="cpu", threads=1, batch_size=batch)
    rows.append(("tiny CLIP: embed image", median_ms(lambda: clip.embed_images(images), max(3, runs // 5)) / batch))
    clip_settings = QcSettings(clip_model=TINY_MODEL, negative_concepts=("text", "watermark"))
    prompts = [f"an astronaut, variation {i}" for i in range(batch)]
    clip_models = QcModels(clip_settings, clip=clip)  # measures the batch with `clip`, then judges it
    rows.append(
        (
            "evaluate + tiny CLIP",
            median_ms(lambda: clip_models.evaluate_batch(images, prompts), max(3, runs // 5)) / batch,
        )
    )

    # a production architecture with random weights: the same arithmetic as with real ones
    for architecture in architectures:
        big = ClipScorer(architecture, None, device="cpu", threads=1, batch_size=batch)
        rows.append(
            (f"{architecture} (random w.): image", median_ms(lambda scorer=big: scorer.embed_images(images), 3) / batch)
        )
    return rows


def index_rows(sizes: list[int], queries: int) -> list[str]:
    lines = []
    rng = np.random.default_rng(1)
    for size in sizes:
        hashes = rng.integers(0, 2**64, size=size, dtype=np.uint64)
        ids = [f"img-{i}" for i in range(size)]
        index = PhashIndex()
        start = time.perf_counter()
        index.add_many(ids, hashes.tolist())
        build_s = time.perf_counter() - start
        # queries: near copies of indexed hashes (4 bits flipped)
        rows = rng.integers(0, size, size=queries)
        flips = np.zeros(queries, dtype=np.uint64)
        for _ in range(4):
            flips |= np.uint64(1) << rng.integers(0, 64, size=queries).astype(np.uint64)
        probes = (hashes[rows] ^ flips).tolist()
        for radius in (6, 10):
            start = time.perf_counter()
            for probe in probes:
                index.nearest(probe, radius)
            per_query = (time.perf_counter() - start) / queries * 1000
            candidates = float(np.mean([index.candidates(p, radius).size for p in probes[:100]]))
            start = time.perf_counter()
            for probe in probes[:200]:
                distances = np.bitwise_count(hashes ^ np.uint64(probe))
                int(distances.argmin())
            scan = (time.perf_counter() - start) / 200 * 1000
            lines.append(
                f"| {size:>9,} | {build_s:>7.2f} | {radius:>2} | {per_query:>8.3f} "
                f"| {candidates:>10,.0f} | {scan:>12.3f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement (median)")
    parser.add_argument("--batch", type=int, default=8, help="images per evaluate_batch call")
    parser.add_argument("--index-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the first allowed)")
    parser.add_argument(
        "--architectures",
        nargs="*",
        default=["ViT-B-32"],
        help="open_clip architectures to time with random weights (no download)",
    )
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        core = args.core if args.core is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        where = f"pinned to core {core}"
    else:
        where = "not pinned (no sched_setaffinity here)"
    print(
        f"QC cost per 1024 x 1024 image, one core ({where}), {platform.processor() or platform.machine()}, "
        f"median of {args.runs} runs"
    )
    print()
    print("| measurement                  | ms / image | images / s / core |")
    print("|------------------------------|------------|-------------------|")
    for name, ms in check_rows(args.runs, args.batch, args.architectures):
        print(f"| {name:<28} | {ms:>10.2f} | {1000 / ms:>17.0f} |")
    print()
    print(f"pHash index: random 64-bit hashes, {args.queries} queries 4 bits from an indexed one")
    print()
    print("|      rows | build s |  r | ms/query | candidates | full scan ms |")
    print("|-----------|---------|----|----------|------------|--------------|")
    for line in index_rows(args.index_sizes, args.queries):
        print(line)


if __name__ == "__main__":
    main()
