"""benchmarks/flops.py: one image's FLOPs by layer kind, counted on the meta device."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.flops import KINDS, image_flops, main, parse_rates, table


def test_the_kinds_add_up_to_torch_s_own_count_on_the_tiny_model():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.pipelines import build_pipeline

    flops = image_flops("tiny", size=64, steps=3)
    assert set(flops) == set(KINDS) and all(v > 0 for v in flops.values())
    # The UNet kinds are 3 steps of two latents (guidance); the decode is once per image.
    pipe = build_pipeline("tiny", torch.device("meta"), torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.vae.decode(torch.zeros(1, 4, 8, 8, device="meta", dtype=torch.bfloat16))
    assert flops["VAE decode"] == counter.get_total_flops()
    unguided = image_flops("tiny", size=64, steps=3, guidance=False)
    for kind in KINDS[:-1]:
        assert flops[kind] == 2 * unguided[kind], kind


def test_sdxl_at_1024_is_416_tflops_mostly_in_fp8_linear_layers():
    flops = image_flops("sdxl")
    total = sum(flops.values())
    assert total / 1e12 == pytest.approx(416, abs=1)  # the figure quoted for SDXL at 1024², 30 steps, guidance on
    assert 0.60 < flops["FP8 Linear"] / total < 0.63  # counted: 61.7 %
    assert 0.22 < (flops["conv 3x3"] + flops["conv 1x1"]) / total < 0.25
    assert 0.10 < flops["attention"] / total < 0.13


def test_rates_give_the_kernels_only_floor_and_unknown_kinds_are_named(capsys):
    flops = {kind: 1e12 for kind in KINDS}
    text = table(flops, {"FP8 Linear": 1000.0, "attention": 500.0})
    assert "| FP8 Linear | 1 | 16.7% | 1000 | 0.001 |" in text
    assert "| conv 3x3 | 1 | 16.7% | - | - |" in text
    assert text.endswith("| total | 6 | 100% | | 0.003 (kernels only) |")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown kind 'convs'"):
        parse_rates("convs=400")
    with pytest.raises(SystemExit):
        main(["--size", "100"])
    assert "multiple of 8" in capsys.readouterr().err
