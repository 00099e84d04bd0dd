"""Latency of the HTTP path over a direct generator call, on the tiny models (CPU).

    python -m benchmarks.serve_latency [--requests 20] [--steps 8] [--size 256x256]

Three timings of the same one-image request, sequential, medians:
  direct     Generator.render in this process
  direct+    the same plus QC, post-processing and the catalog append (ServeCore.finish)
  http       POST /v1/generate to the Ray Serve app on loopback (ingress -> generator replica ->
             ingress), base64 response
The overhead of serving is http - direct+: routing, serialisation, batching wait, base64.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", default="256x256")
    p.add_argument("--batch-wait", type=float, default=0.0, help="serve.batch wait (s); 0 for pure latency")
    args = p.parse_args(argv)
    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)

    import httpx
    import ray
    from ray import serve

    from app.generator import Generator
    from app.serve.app import build_app
    from app.serve.config import load_serve_config
    from app.serve.core import ImageJob, ServeCore, resolve_serve_models

    width, _, height = args.size.partition("x")
    out = tempfile.mkdtemp(prefix="imagefab-latency-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_serve_config(
        None,
        output_uri=out,
        port=port,
        steps=args.steps,
        batching={"max_batch_size": 1, "batch_wait_timeout_s": args.batch_wait},
    )
    models = resolve_serve_models(config)
    core = ServeCore(config, models)
    base = next(iter(models.bases.values()))
    gen = Generator(base, models.loras, config.compute)

    def job(i):
        return ImageJob(prompt=f"latency probe {i}", seed=i, width=int(width), height=int(height))

    direct, direct_plus = [], []
    for i in range(args.requests + 2):
        reqs = core.plan(job(i))
        t0 = time.perf_counter()
        results = gen.render(reqs)
        t1 = time.perf_counter()
        core.finish(
            reqs,
            [
                {
                    "image_id": r.image_id,
                    "error": r.error,
                    "pixels": r.pixels.tobytes(),
                    "gpu_seconds": r.gpu_seconds,
                    "accelerator": gen.accelerator,
                }
                for r in results
            ],
        )
        t2 = time.perf_counter()
        if i >= 2:  # warm-up
            direct.append(t1 - t0)
            direct_plus.append(t2 - t0)
    del gen

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="latency", route_prefix="/")
    http = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for i in range(args.requests + 2):
            body = {"prompt": f"latency probe {1000 + i}", "seed": 1000 + i, "width": int(width), "height": int(height)}
            t0 = time.perf_counter()
            r = client.post("/v1/generate", json=body)
            elapsed = time.perf_counter() - t0
            r.raise_for_status()
            if i >= 2:
                http.append(elapsed)
    serve.shutdown()
    ray.shutdown()

    med = {k: statistics.median(v) * 1000 for k, v in (("direct", direct), ("direct+", direct_plus), ("http", http))}
    print(
        f"\ntiny-sdxl on CPU, {args.size}, {args.steps} steps, {args.requests} sequential one-image requests, medians"
    )
    print("| path | ms |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} |")
    print(f"| HTTP overhead (http - direct+) | {med['http'] - med['direct+']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
