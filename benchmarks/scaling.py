"""How bulk throughput scales with generator actors, and what an image costs per GPU type.

    python -m benchmarks.scaling                          # 1, 2, 4, 8 actors, 4 images/s each, ~15 s of work each
    python -m benchmarks.scaling --actors 1,2 --seconds 5 # smaller
    python -m benchmarks.scaling --costs-only             # just the cost table

Part 1 runs the real bulk job (`jobs.generate.run`) on a local Ray that advertises 8 GPUs
(`ray.init(num_gpus=8)`: scheduling is real, the GPUs are not), with the generator replaced by
`benchmarks/standin.py` — a fixed `--rate` images/s per actor, precomputed images. So the job
places one actor per "GPU" exactly as on a cluster, and everything else (Ray Data, QC, the master
PNG, the catalog) runs for real. Images are 64x64, post-processing presets and the model-based and
duplicate QC checks are off, so the CPU stage costs little: on a 2-core machine it would otherwise be
the bottleneck long before 8 generators, and the point here is the generator pool's scaling.
Each configuration renders `rate x actors x seconds` images, so each runs for about the same time.

Reported per configuration: end-to-end wall time and images/s (job start to summary, including
spec checks, expansion and actor start-up) and steady-state images/s (images catalogued after
every actor's first batch, over the time from then to the last catalog write); efficiency =
steady images/s / (actors x rate).

Part 2 is arithmetic, no measurement: images/hour and USD per 10,000 images per GPU type at the
list prices of `app/cost.py`, from quoted H200 seconds per image measured outside this project (stock
diffusers 0.42.1, SDXL 1024², 30 steps: 1.16 s at batch 8, 1.06 s compiled at batch 4), scaled to
other GPUs by their dense bf16 tensor throughput, which assumes the same utilisation everywhere.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets, no sparsity).
BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
# Quoted, measured outside this project: H200, stock diffusers 0.42.1, SDXL 1024², 30 steps, guidance on.
H200_SECONDS_PER_IMAGE = {"stock, batch 8": 1.16, "compiled, batch 4": 1.06}


@dataclass
class ScalingResult:
    actors: int
    images: int
    wall_seconds: float
    steady_images_per_second: float
    rate: float
    cpu_seconds: float

    @property
    def end_to_end_images_per_second(self) -> float:
        return self.images / self.wall_seconds

    @property
    def efficiency(self) -> float:
        return self.steady_images_per_second / (self.actors * self.rate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--actors", default="1,2,4,8", help="generator pool sizes, comma-separated (at most 8)")
    p.add_argument("--rate", type=float, default=4.0, help="images/s of one stand-in generator")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of generator work per configuration")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--qc-workers", type=int, default=2, help="most CPU-stage actors")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--costs-only", action="store_true", help="print the cost table only")
    args = p.parse_args(argv)
    args.actors = [int(a) for a in args.actors.split(",")]
    if not args.actors or min(args.actors) < 1 or max(args.actors) > 8:
        p.error(f"--actors: pool sizes from 1 to 8 (the local Ray advertises 8 GPUs), got {args.actors}")
    return args


def bench_spec(workdir: Path, actors: int, args: argparse.Namespace):
    """A spec for `rate x actors x seconds` distinct 64x64 images with the cheap CPU stage."""
    from app.spec import parse_spec

    images = max(actors * args.batch_size, round(args.rate * actors * args.seconds))
    inp = workdir / f"prompts-{actors}.csv"
    with open(inp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pid", "subject"])
        w.writerows([f"p{i}", f"test object number {i}"] for i in range(images))
    return parse_spec(
        {
            "run_name": f"scaling-{actors}",
            "input": {"path": str(inp), "prompt_template": "studio photo of a {subject}", "key_column": "pid"},
            "model": {"base": "tiny-sdxl"},
            "steps": 1,
            "size": {"width": args.size, "height": args.size},
            "qc": {"enabled": ["sharpness", "contrast", "exposure", "blank", "nonfinite"]},
            "postprocess": {"presets": [], "format": "png"},
            "output": {"uri": str(workdir / f"out-{actors}")},
            "compute": {"generators": actors, "batch_size": args.batch_size, "qc_workers": args.qc_workers},
        },
        where="benchmark",
    )


def measure(actors: int, args: argparse.Namespace, workdir: Path) -> ScalingResult:
    from app.catalog.store import CatalogStore
    from app.storage import OutputStore
    from benchmarks.standin import StandInGenerator
    from jobs.generate import run

    spec = bench_spec(workdir, actors, args)
    summary = run(spec, quiet=True, generator_cls=StandInGenerator.at_rate(args.rate))
    if summary.counts.get("failed"):
        raise RuntimeError(f"{actors} actor(s): {summary.counts['failed']} images failed; see {spec.output.uri}")
    if summary.generators != actors or summary.accelerator != "GPU":
        raise RuntimeError(
            f"expected {actors} generator(s) on GPUs, the job ran {summary.generators} on {summary.accelerator}"
        )
    written = CatalogStore(OutputStore.at(spec.output.uri)).read(["created_at"]).column("created_at").to_pylist()
    # Steady state: the images finished after every actor has written its first batch (one
    # catalog write per batch), over the time from then to the last write.
    writes = sorted(set(written))
    start = writes[min(actors, len(writes) - 1) - 1] if len(writes) > 1 else writes[0]
    span = (writes[-1] - start).total_seconds()
    steady = sum(t > start for t in written) / span if span > 0 else float("nan")
    return ScalingResult(actors, summary.rendered, summary.wall_seconds, steady, args.rate, summary.cpu_seconds)


def scaling_table(results: list[ScalingResult]) -> str:
    one = next((r for r in results if r.actors == 1), None)
    lines = [
        "| generator actors | images | wall s | end-to-end img/s | steady img/s | ideal img/s | efficiency "
        "| speed-up vs 1 | CPU stage ms/image |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speedup = f"{r.steady_images_per_second / one.steady_images_per_second:.2f}x" if one else "–"
        lines.append(
            f"| {r.actors} | {r.images} | {r.wall_seconds:.1f} | {r.end_to_end_images_per_second:.2f} | "
            f"{r.steady_images_per_second:.2f} | {r.actors * r.rate:.1f} | {r.efficiency:.0%} | {speedup} | "
            f"{1000 * r.cpu_seconds / r.images:.1f} |"
        )
    return "\n".join(lines)


def cost_table() -> str:
    from app.cost import PriceTable

    prices = PriceTable()
    lines = [
        "| GPU | list USD/h | bf16 TFLOP/s | setting | s/image | images/h | USD per 10,000 images | source |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for gpu, tflops in BF16_TFLOPS.items():
        hourly = prices.device_hourly(f"cuda:NVIDIA {gpu}")
        for setting, h200_seconds in H200_SECONDS_PER_IMAGE.items():
            seconds = h200_seconds * BF16_TFLOPS["H200"] / tflops
            source = "quoted" if gpu == "H200" else "H200 quote x bf16 ratio"
            lines.append(
                f"| {gpu} | {hourly:.2f} | {tflops:g} | {setting} | {seconds:.2f} | {3600 / seconds:,.0f} | "
                f"{10_000 * seconds / 3600 * hourly:.2f} | {source} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.costs_only:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Logical CPUs: each GPU generator reserves one (they sleep), plus the CPU stage and reads.
        ray.init(
            address="local",  # a fresh Ray of its own, never a head recorded by an earlier `ray start`
            num_cpus=max(args.actors) + 4,
            num_gpus=8,
            object_store_memory=300 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
        results = []
        with tempfile.TemporaryDirectory(prefix="imagefab-scaling-") as tmp:
            for actors in args.actors:
                t0 = time.perf_counter()
                results.append(measure(actors, args, Path(tmp)))
                print(
                    f"{actors} actor(s): {results[-1].steady_images_per_second:.2f} images/s steady "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        ray.shutdown()
        print(
            f"\n## Generator scaling: stand-in at {args.rate:g} images/s per actor, {args.size}x{args.size}, "
            f"batch {args.batch_size}, {os.cpu_count()} CPU cores\n"
        )
        print(scaling_table(results))
    print("\n## Cost per GPU type (SDXL 1024², 30 steps; list prices from app/cost.py)\n")
    print(cost_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
