"""Can the CPU side keep a GPU fed? Each CPU stage alone, then the whole Ray pipeline.

    python -m benchmarks.cpu_pipeline [--images 48] [--size 1024] [--workers 1]

1. Standalone, one core, per 1024² image: QC (the full CPU QC, CLIP excluded: it belongs on the
   generator's GPU), the master PNG (level 1), the platform variants, the invisible watermark and
   C2PA signing of the master and the variants (on by default), the NSFW check, the catalog append.
   Capacity per core = 1 / (sum of those).
2. The bulk job through Ray Data with a stand-in generator (benchmarks/standin.py) fast enough
   never to be the bottleneck, returning precomputed 1024² photographs; `--workers` CPU-stage
   actors (each one Python process, so at most one core each). Pipeline per core = images/s per
   worker. Efficiency = pipeline per core / standalone capacity per core (the target: >= 80 %).
3. Cores needed to keep one H200 fed at 1.5 images/s = 1.5 / pipeline per core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.standin import VARIANTS, StandInGenerator

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")


def photo(name: str, side: int) -> np.ndarray:
    from PIL import Image
    from skimage import data as skdata

    pixels = getattr(skdata, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.asarray(Image.fromarray(pixels[:, :, :3]).resize((side, side), Image.Resampling.LANCZOS))


class PhotoStandIn(StandInGenerator):
    """The stand-in with real photographs instead of noise: noise is the worst case for PNG and
    would overstate the encoder's share."""

    def _image(self, width: int, height: int, seed: int) -> np.ndarray:
        if (width, height) not in self._images:
            self._images[(width, height)] = np.stack([photo(PHOTOS[i % len(PHOTOS)], width) for i in range(VARIANTS)])
        # 8 photos x 4 rotations x 2 mirrorings: 64 images that are not near-duplicates of each
        # other, so QC does the full work and variants are written as for accepted images.
        image = np.rot90(self._images[(width, height)][seed % VARIANTS], k=(seed // VARIANTS) % 4)
        return np.ascontiguousarray(image[:, ::-1] if (seed // (4 * VARIANTS)) % 2 else image)


def per_image_ms(fn, images, repeats: int = 3) -> float:
    best = []
    for img in images:
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn(img)
            times.append(time.process_time() - t0)
        best.append(min(times))
    return statistics.median(best) * 1000


def standalone(spec, images: list[np.ndarray], out: Path) -> dict[str, float]:
    from PIL import Image

    from app.catalog.store import CatalogStore
    from app.postprocess import encode_master, render_variants
    from app.qc import QcModels
    from app.storage import OutputStore

    models = QcModels.load(spec.qc)
    store = CatalogStore(OutputStore.at(str(out)))
    costs = {
        "QC (no CLIP)": per_image_ms(lambda im: models.evaluate_batch([im], ["a photo"], image_ids=["x" * 32]), images),
        "master PNG (level 1)": per_image_ms(lambda im: encode_master(Image.fromarray(im), None, 1), images),
        f"variants {list(spec.postprocess.presets)}": per_image_ms(
            lambda im: render_variants(Image.fromarray(im), spec.postprocess), images
        ),
    }
    costs.update(provenance_costs(spec, images, out))
    batch = [{"image_id": f"{i:032x}", "status": "accepted"} for i in range(16)]
    t0 = time.process_time()
    for k in range(5):
        store.append(batch, run_id=f"bench{k}", date="2026-01-01")
    costs["catalog append (per image, batches of 16)"] = (time.process_time() - t0) / (5 * 16) * 1000
    return costs


def provenance_costs(spec, images: list[np.ndarray], out: Path) -> dict[str, float]:
    """Invisible watermark and C2PA signing of the master and every variant, and the NSFW check
    (off in this benchmark's QC list, so measured here on its own)."""
    from PIL import Image

    from app.postprocess import PRESETS, encode_image, encode_master, fit_to_preset
    from app.provenance import watermark
    from app.provenance.devca import ensure_dev_credentials
    from app.provenance.screening import NsfwClassifier
    from app.provenance.signing import GenerationRecord, Ingredient, ModelRecord, load_signer, sign_master, sign_variant

    creds = ensure_dev_credentials(out / "home")
    signer = load_signer(creds.chain, creds.key)
    image_id = "ab" * 32
    presets = [PRESETS[name] for name in spec.postprocess.presets]

    def mark_all(im: np.ndarray) -> None:
        watermark.embed(im, image_id)
        for preset in presets:
            watermark.embed(np.asarray(fit_to_preset(Image.fromarray(im), preset)), image_id)

    encoded = {
        id(im): (
            encode_master(Image.fromarray(im), None, 1),
            [encode_image(fit_to_preset(Image.fromarray(im), p), "jpeg") for p in presets],
        )
        for im in images
    }
    record = GenerationRecord(image_id, "bench", ModelRecord("sdxl-base", "0" * 64), watermark_payload=image_id[:12])

    def sign_all(im: np.ndarray) -> None:
        master, variants = encoded[id(im)]
        signed = sign_master(master, "png", record, signer, "m.png")
        for data in variants:
            sign_variant(data, "jpeg", Ingredient("m.png", signed, "png"), signer, image_id=image_id,
                         generator_version="bench", title="v.jpg", watermarked=False)  # fmt: skip

    nsfw = NsfwClassifier(threads=1)
    return {
        "invisible watermark (master + variants)": per_image_ms(mark_all, images),
        "C2PA signing (master + variants)": per_image_ms(sign_all, images),
        "NSFW score (NudeNet, when enabled)": per_image_ms(nsfw.score, images),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="CPU-stage actors")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)

    import ray

    from app.spec import load_spec
    from jobs.generate import run

    tmp = Path(tempfile.mkdtemp(prefix="imagefab-cpu-bench-"))
    # Seeds 0..N-1: the stand-in turns seed k into one of 64 distinct images (photo, rotation,
    # mirroring), so up to 64 images none is a near-duplicate and every one gets full QC and variants.
    rows = "\n".join(f"{i},product shot {i},{i}" for i in range(args.images))
    (tmp / "rows.csv").write_text("key,prompt,seed\n" + rows + "\n")
    (tmp / "job.yaml").write_text(
        textwrap.dedent(f"""\
        run_name: cpu-bench
        input: {{path: rows.csv, prompt_column: prompt, key_column: key}}
        size: {args.size}x{args.size}
        steps: 1
        qc: {{enabled: [sharpness, contrast, exposure, blank, nonfinite, color_cast, black_block,
                        green_block, blockiness, banding, duplicates]}}
        postprocess: {{presets: [instagram_square, thumbnail], format: jpeg, quality: 90}}
        compute: {{batch_size: {args.batch}, qc_workers: {args.workers}}}
    """)
    )
    spec = load_spec(tmp / "job.yaml", {"output.uri": str(tmp / "out")})

    import torch

    torch.set_num_threads(1)
    images = [photo(name, args.size) for name in PHOTOS[:4]]
    costs = standalone(spec, images, tmp / "standalone")
    capacity = 1000 / sum(costs.values())

    ray.init(address="local", num_cpus=max(2, args.workers + 1), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run(spec, quiet=True, generator_cls=PhotoStandIn.at_rate(1000.0))
    wall = time.perf_counter() - t0
    ray.shutdown()
    # Throughput while images flow (first result to last): start-up (Ray reading the input, the
    # plan, actors starting) is a fixed cost per run, not a rate.
    streaming = summary.streaming_images_per_second
    per_worker = streaming / args.workers

    print(f"\nCPU side per {args.size}² image, one core ({os.cpu_count()} cores here), photographs")
    print("| stage | ms per image |\n|---|---|")
    for name, ms in costs.items():
        print(f"| {name} | {ms:.1f} |")
    print(f"| **standalone capacity** | **{capacity:.2f} images/s per core** |")
    print(
        f"\nRay pipeline, {summary.rendered} images, stand-in generator, {args.workers} CPU-stage worker(s): "
        f"{streaming:.2f} images/s while streaming (first result to last); {wall:.1f} s in all with start-up"
    )
    print("| measure | value |\n|---|---|")
    print(f"| pipeline per worker | {per_worker:.2f} images/s |")
    print(f"| efficiency vs standalone | {per_worker / capacity:.0%} |")
    print(f"| cores to feed one H200 at 1.5 images/s | {1.5 / per_worker:.1f} |")
    print(f"| outcome | {summary.counts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
