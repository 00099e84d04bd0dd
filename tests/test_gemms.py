"""benchmarks/gemms.py: SDXL's FP8-able matmuls timed alone, per shape and per UNet step."""

from __future__ import annotations

import pytest
import torch

from benchmarks.flops import linear_shapes
from benchmarks.gemms import VARIANTS, measure, table


def test_the_shapes_are_the_fused_generator_s_fp8_layers():
    shapes = linear_shapes("sdxl", 1024, latents=16)
    # Level 2 (64² tokens, 640 channels) and level 3 (32² tokens, 1280), 16 latents; fused QKV
    # for self-attention, fused KV over the 77 text tokens for cross-attention.
    assert shapes[65536, 640, 1920] == 10 and shapes[16384, 1280, 3840] == 60
    assert shapes[16 * 77, 2048, 2560] == 60 and shapes[16 * 77, 2048, 1280] == 10
    assert shapes[16384, 5120, 1280] == 60  # GEGLU's output projection
    flops = sum(2 * m * k * n * calls for (m, k, n), calls in shapes.items())
    assert flops * 30 / 8 / 1e12 == pytest.approx(256.8, abs=0.1)  # benchmarks/flops.py's FP8 Linear per image


def test_every_variant_is_timed_and_the_step_sums_its_calls():
    shapes = linear_shapes("tiny", 64, latents=4)
    result = measure(shapes, torch.device("cpu"), torch.float32, repeats=2)
    assert len(result["shapes"]) == len(shapes)
    for v in VARIANTS:
        per_call = [r["seconds"][v] for r in result["shapes"]]
        assert all(t > 0 for t in per_call), v
        assert result["step"][v] == pytest.approx(sum(t * r["calls"] for t, r in zip(per_call, result["shapes"])))
    text = table(result)
    assert text.count("\n") == len(shapes) + 2 and text.splitlines()[-1].startswith("| one UNet step | |")


def test_a_variant_this_torch_cannot_run_shows_as_a_dash():
    result = {
        "shapes": [
            {
                "m": 16,
                "k": 32,
                "n": 16,
                "calls": 2,
                "seconds": {
                    "high precision": 1e-6,
                    "fp8 row fast": None,
                    "fp8 row": None,
                    "fp8 tensor fast": 1e-6,
                    "quantise": 1e-6,
                },
            }
        ],
        "step": {
            "high precision": 2e-6,
            "fp8 row fast": None,
            "fp8 row": None,
            "fp8 tensor fast": 2e-6,
            "quantise": 2e-6,
        },
    }
    assert "| 16 x 32 x 16 | 2 | 0.01638 | - | - | 0.01638 | 0.001 |" in table(result)
