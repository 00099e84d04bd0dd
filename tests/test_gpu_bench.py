"""The GPU benchmark's code path, run on the CPU with the tiny architecture: the same script that
measures SDXL on an H100/H200 builds, renders through stock diffusers and imagefab's Generator
(eager, compiled, compiled + FP8, each compiled row on a pipeline of its own), counts FLOPs,
compares pixels and keeps to its time budget."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = ["--config", "tiny", "--device", "cpu", "--size", "64", "--steps", "2", "--repeats", "1", "--lora-rank", "4"]


def test_every_variant_renders_the_stock_image(capsys, tmp_path):
    from benchmarks.gpu_bench import main

    out = tmp_path / "rows.json"
    # The Generator's default compile cache in the tests' model home, kept between runs and shared
    # with tests/test_compiled_generator.py (same FP8 graphs): a rerun loads the tiny graphs
    # instead of compiling them again (~2-3 min cold on a 2-core machine, both variants together).
    cache = Path(os.environ["IMAGEFAB_HOME"]) / "compile-cache"
    # The GPU's settings (fused QKV, channels_last; the CPU's default is off): fused QKV is where a
    # pipeline used twice would go wrong (fused over fused, LoRA adapters bypassed).
    # Decodes overlapped as on a GPU (the CPU's default is off): every imagefab row renders its two
    # batches per call through the deferred-collecting path.
    assert (
        main(
            [
                *TINY,
                "--batches",
                "1,2",
                "--compile-batches",
                "2",
                "--fp8-batches",
                "2",
                "--fuse-qkv",
                "--channels-last",
                "--decode-overlap",
                "--compile-cache",
                str(cache),
                "--profile-steps",
                "1",
                "--gemms",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| torch " in printed.splitlines()[0] and "| diffusers " in printed.splitlines()[0]
    # A table after every row group, so a run cut short by its device still shows what it measured.
    assert printed.count("| implementation | batch | s/image |") == 5
    report = json.loads(out.read_text())
    assert report["meta"]["card"] == "cpu" and not report["skipped"] and not report["failed"]
    # The FP8-able matmuls alone, first, at the FP8 row's batch (2 images: 4 latents per step).
    assert "the FP8-able matmuls alone, batch 2 (4 latents per step)" in printed
    assert printed.index("the FP8-able matmuls alone") < printed.index("| diffusers eager | 1 |")
    gemms = report["meta"]["gemms"]
    assert gemms["batch"] == 2 and all(s > 0 for s in gemms["step"].values())
    rows = {(r["impl"], r["batch"]): r for r in report["rows"]}
    assert list(rows) == [
        ("diffusers eager", 1),
        ("diffusers eager", 2),
        ("imagefab eager", 1),
        ("imagefab eager", 2),
        # FP8 first: a run cut short by its time budget keeps the row the target needs.
        ("imagefab fp8", 2),
        ("imagefab compiled", 2),
        ("imagefab compiled, no decode overlap", 2),
    ]
    assert all(r["seconds_per_image"] > 0 and r["tflops"] > 0 for r in rows.values())
    # FLOPs are counted once per implementation at batch 1 and scaled: compiled and FP8 rows do
    # imagefab eager's arithmetic.
    flops = {k: r["tflops"] * r["seconds_per_image"] for k, r in rows.items()}
    assert flops["imagefab compiled", 2] == pytest.approx(flops["imagefab eager", 2])
    assert flops["imagefab fp8", 2] == pytest.approx(flops["imagefab eager", 2])

    # Same seeds, the LoRA fused into the weights (imagefab) vs. stock's unfused adapters: the same
    # image within rounding (float32 here). The compiled rows run on pipelines of their own: a
    # LoRA merged twice or QKV fused over fused QKV would show here as tens of levels.
    for key in [("imagefab eager", 1), ("imagefab eager", 2), ("imagefab compiled", 2), ("imagefab fp8", 2)]:
        assert rows[key]["diff_ref"] == "diffusers eager" and rows[key]["ratio"] > 0, key
    assert rows["imagefab eager", 1]["max_pixel_diff"] <= 2 and rows["imagefab eager", 2]["max_pixel_diff"] <= 2
    assert rows["imagefab compiled", 2]["max_pixel_diff"] <= 3  # measured 1
    # The relative error of the images: ||ours - stock|| / ||stock||, over the pixels.
    for key in [("imagefab eager", 1), ("imagefab eager", 2), ("imagefab compiled", 2)]:
        assert 0 <= rows[key]["relative_error"] < 5e-3, key
    assert rows["diffusers eager", 1]["relative_error"] is None  # the reference itself
    # Overlapping the decode changes when pixels arrive, not the pixels.
    serial = rows["imagefab compiled, no decode overlap", 2]
    assert (serial["max_pixel_diff"], serial["mean_pixel_diff"]) == (
        rows["imagefab compiled", 2]["max_pixel_diff"],
        rows["imagefab compiled", 2]["mean_pixel_diff"],
    )
    # FP8 moves the image a little (measured: 5 of 255 at most, 0.48 on average, UNet error 0.006).
    fp8 = rows["imagefab fp8", 2]
    assert 0 < fp8["max_pixel_diff"] <= 12 and 0 < fp8["mean_pixel_diff"] < 1.5
    assert rows["imagefab compiled", 2]["relative_error"] < fp8["relative_error"] < 0.02
    assert 1e-4 < fp8["fp8_error"] < 0.02
    assert fp8["accelerator"] == "cpu:threads=1+fused_qkv+channels_last+compiled+fp8+batch_bucket=2"
    assert rows["imagefab compiled", 2]["fp8_error"] is None
    assert rows["imagefab compiled", 2]["warmup_seconds"] > 0

    # After each compiled row, one profiled call: its time by kernel kind, shares adding up to 1.
    assert printed.count("where the time goes:") == 2
    profiles = report["meta"]["profiles"]
    assert set(profiles) == {"imagefab compiled b2", "imagefab fp8 b2"}
    for table in profiles.values():
        assert sum(k["share"] for k in table["kinds"].values()) == pytest.approx(1.0)
        assert table["kinds"]["convolution"]["ms"] > 0 and 0 < table["busy_share"] <= 1
    assert profiles["imagefab fp8 b2"]["kinds"]["FP8 matmul"]["count"] > 0  # the FP8 layers ran
    assert "FP8 matmul" not in profiles["imagefab compiled b2"]["kinds"]


def test_rows_that_would_overrun_the_time_budget_are_skipped_with_a_message(capsys, tmp_path):
    from benchmarks.gpu_bench import main

    out = tmp_path / "rows.json"
    assert (
        main(
            [
                *TINY,
                "--batches",
                "1",
                "--compile-batches",
                "2",
                "--fp8-batches",
                "2",
                # A compile estimate no budget fits, and a budget the eager rows fit on a busy
                # machine: with 600 s and 1000 s, a 2-core machine shared with other test runs
                # slowed the eager rows enough to print "estimated 1185" (eager part over 100 s).
                "--time-budget",
                "3600",
                "--compile-estimate",
                "100000",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "skipping imagefab compiled batch 2: estimated 100" in printed  # 100000 s + the eager part
    assert "skipping imagefab fp8 batch 2: estimated 100" in printed
    report = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in report["rows"]] == [("diffusers eager", 1), ("imagefab eager", 1)]
    assert [(s["impl"], s["batch"]) for s in report["skipped"]] == [("imagefab fp8", 2), ("imagefab compiled", 2)]
    assert "budget left" in report["skipped"][0]["reason"]


def test_attention_kernels_are_timed_alone_and_each_choice_is_a_compiled_row(capsys, tmp_path):
    from benchmarks.gpu_bench import main

    out = tmp_path / "rows.json"
    cache = Path(os.environ["IMAGEFAB_HOME"]) / "compile-cache"  # kept between runs, as above
    assert (
        main(
            [
                *TINY,
                "--batches",
                "2",
                # The plain compiled rows (FP8's rows differ only in the UNet they compile, and
                # compiling FP8 costs this CPU three times a plain compile). "auto" is left out:
                # test_every_variant's "imagefab compiled" row is that row, and rendering it again
                # here from the cache cost a pipeline, a trace and two timed rows. "math" compiles
                # the graphs that tests/test_attention.py's compiled generator then loads (or waits
                # for); "cudnn" is the choice this device lacks.
                "--compile-batches",
                "2",
                "--fuse-qkv",
                "--channels-last",
                "--decode-overlap",
                "--attention",
                "math,cudnn",
                "--attention-shapes",
                "--compile-cache",
                str(cache),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    # A choice the device lacks fails its row with the reason; the other rows stand.
    assert not report["skipped"]
    [failed] = report["failed"]
    assert (failed["impl"], failed["batch"]) == ("imagefab compiled, cudnn attention", 2)
    assert failed["error"].startswith(
        "RuntimeError: compute.attention=cudnn: the cudnn attention kernel cannot run on cpu"
    )
    # The attention calls alone, first: the tiny UNet's 12 self- and 12 cross-attentions per step,
    # under the --attention choices and the usual alternatives; the CPU lacks two of them.
    assert printed.index("SDXL's attention calls alone, batch 2 (4 latents per step)") < printed.index(
        "| diffusers eager |"
    )
    shapes = report["meta"]["attention_shapes"]
    assert shapes["kernels"] == ["math", "cudnn", "auto", "flash", "efficient"]  # --attention's first
    assert sorted((r["shape"], r["calls"]) for r in shapes["shapes"]) == [
        ([4, 4, 16, 16, 16], 12),
        ([4, 4, 16, 77, 16], 12),
    ]
    assert shapes["step"]["auto"] > 0 and shapes["step"]["math"] > 0 and shapes["step"]["cudnn"] is None
    assert set(shapes["unsupported"]) == {"cudnn", "efficient"}
    # One compiled row per choice, each compiled with its own kernel and recorded as such.
    rows = {r["impl"]: r for r in report["rows"] if r["batch"] == 2}
    assert [impl for impl in rows if "compiled" in impl] == [
        "imagefab compiled, math attention",
        "imagefab compiled, math attention, no decode overlap",
    ]
    math = rows["imagefab compiled, math attention"]
    assert math["accelerator"] == "cpu:threads=1+fused_qkv+channels_last+compiled+batch_bucket=2+attention=math"
    # The same arithmetic in another order: the image stays stock's image within rounding (as the
    # "auto" compiled row's does in test_every_variant: at most 3 of 255, relative error < 5e-3).
    assert math["max_pixel_diff"] <= 3 and 0 <= math["relative_error"] < 5e-3 and math["mean_pixel_diff"] < 0.2
