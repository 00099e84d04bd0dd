"""On a cluster with GPUs, generators are placed one per GPU (`num_gpus=1`).

Ray can advertise GPUs that do not exist (`ray.init(num_gpus=1)`), which exercises the scheduling
on this CPU machine: the actor gets the GPU resource, sees no CUDA device and renders on the CPU.
A Ray instance of its own is needed, so the job runs in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    from app.spec import load_spec
    from jobs.generate import run
    spec = load_spec("specs/ecommerce.yaml", {"output.uri": sys.argv[1], "input.limit": 1,
                                              "postprocess.presets": ["thumbnail"]})
    s = run(spec, quiet=True)
    print("RESULT " + json.dumps({"generators": s.generators, "accelerator": s.accelerator,
                                  "rendered": s.rendered, "counts": s.counts}))
""")


def test_generators_take_one_gpu_each_when_the_cluster_has_gpus(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["generators"] == 1 and result["accelerator"] == "GPU"
    assert result["rendered"] == 2 and result["counts"]["failed"] == 0
