"""The GPU benchmark's code path, run on the CPU with the tiny architecture: the same script that
measures SDXL on an H100/H200 builds, renders through stock diffusers and imagefab's Generator,
counts FLOPs and compares pixels."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_benchmark_runs_and_imagefab_matches_stock_pixels(capsys, tmp_path):
    import json

    from benchmarks.gpu_bench import main

    out = tmp_path / "rows.json"
    assert main(["--config", "tiny", "--device", "cpu", "--size", "64", "--steps", "2", "--batches", "1,2",
                 "--repeats", "1", "--lora-rank", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| implementation | batch | s/image |" in table
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in rows] == [
        ("diffusers eager", 1), ("diffusers eager", 2), ("imagefab eager", 1), ("imagefab eager", 2)]
    ours = [r for r in rows if r["impl"] == "imagefab eager"]
    # Same seeds, the LoRA fused into the weights vs. stock's unfused adapters: the same image
    # within rounding (float32 here; bf16 on a GPU).
    assert all(r["max_pixel_diff"] is not None and r["max_pixel_diff"] <= 2 for r in ours)
    assert all(r["seconds_per_image"] > 0 and r["ratio"] > 0 for r in ours)
