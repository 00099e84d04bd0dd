"""The compiled generator on the CPU with the tiny architecture: LoRA stacks switch
without recompiling, short batches are padded to the compiled shape, and compiled graphs are
shared between generator processes through the compile cache. Inductor compiles for the CPU
here (a C++ compiler), the same code path that compiles CUDA kernels on a GPU machine."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from app.compute import ComputeSpec
from app.request import LoraRef, RenderRequest, requests_to_arrow
from app.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parents[1]


def request(base, loras, i: int, stack=(), fuse: bool = True, seed: int | None = None) -> RenderRequest:
    uses = tuple(LoraRef(name=n, version=loras[n].version, weight=w, sha256=loras[n].sha256) for n, w in stack)
    return RenderRequest(
        image_id=f"img{i:03d}",
        prompt="a red shoe",
        negative_prompt="",
        base_model=base.lineage(),
        loras=uses,
        scheduler="euler",
        steps=2,
        guidance=5.0,
        width=64,
        height=64,
        seed=i if seed is None else seed,
        fuse_loras=fuse and bool(uses),
    )


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# --- spec checks (fast) ----------------------------------------------------------------------------
def test_compile_with_an_unfused_lora_combination_is_refused_naming_it():
    data = {
        "run_name": "t",
        "input": {"path": "/x.parquet"},
        "compute": {"compile": True},
        "combinations": {
            "plain": {},
            "styled": {"loras": [{"name": "tiny-style"}]},
            "merged": {"loras": [{"name": "tiny-style"}], "fuse_loras": True},
        },
    }
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert "styled" in str(e.value) and "fuse_loras: true" in str(e.value) and "merged" not in str(e.value)
    data["combinations"]["styled"]["fuse_loras"] = True
    assert parse_spec(data).compute.compile


def test_serve_config_with_compile_needs_every_combination_fused():
    from app.serve.config import load_serve_config

    with pytest.raises(SpecError, match="default"):  # requests may add a stack to any combination
        load_serve_config(combinations={"default": {}}, compute={"compile": True})
    assert load_serve_config(combinations={"default": {"fuse_loras": True}}, compute={"compile": True}).compute.compile


def test_regenerate_rebuilds_the_recorded_batch_bucket():
    from app.regenerate import recorded_compute

    padded = recorded_compute("cuda:NVIDIA H200+fused_qkv+channels_last+compiled+batch_bucket=4", 1)
    assert (padded.batch_size, padded.batch_invariant, padded.compile, padded.fuse_qkv) == (4, False, True, True)
    alone = recorded_compute("cpu:threads=2+fused_qkv", 1)
    assert (alone.batch_size, alone.batch_invariant, alone.cpu_threads, alone.compile) == (1, True, 2, False)
    assert padded.compile_mode == "default"


def test_a_compile_mode_other_than_default_is_recorded_and_regenerated(tiny_base):
    from app.generator import Generator
    from app.regenerate import recorded_compute

    # No warm-up sizes: torch.compile only wraps here, the first render would compile.
    gen = Generator(tiny_base, {}, ComputeSpec(device="cpu", compile=True, compile_mode="max-autotune-no-cudagraphs"))
    assert gen.accelerator == "cpu:threads=1+compiled+compile_mode=max-autotune-no-cudagraphs"
    assert recorded_compute(gen.accelerator, 1).compile_mode == "max-autotune-no-cudagraphs"
    assert Generator(tiny_base, {}, ComputeSpec(device="cpu", compile=True)).accelerator == "cpu:threads=1+compiled"


def test_generators_with_the_same_graphs_take_turns_at_compiling_and_others_do_not_wait(tmp_path):
    import threading

    from app.generator.pipeline import compiling_alone

    graphs = {"settings": {"fp8": True, "batch_bucket": 2}, "sizes": ["64x64"]}
    events: list[str] = []
    first_in, release = threading.Event(), threading.Event()

    def first():
        with compiling_alone(str(tmp_path), graphs):
            events.append("first compiles")
            first_in.set()
            release.wait(10)
            events.append("first done")

    def second(name: str, same: dict):
        with compiling_alone(str(tmp_path), same):
            events.append(name)

    t1 = threading.Thread(target=first)
    t1.start()
    first_in.wait(10)
    other = threading.Thread(target=second, args=("other settings compile", {**graphs, "sizes": ["128x128"]}))
    other.start()
    other.join(10)  # a different set of graphs: not held up
    same = threading.Thread(target=second, args=("same settings load", dict(graphs)))
    same.start()
    same.join(0.5)
    assert same.is_alive()  # waits for the first's compile
    release.set()
    for t in (t1, same):
        t.join(10)
    assert events == ["first compiles", "other settings compile", "first done", "same settings load"]


# --- compiled rendering (slow: inductor compiles the tiny UNet and VAE for the CPU) ----------------
# One compiled generator for these tests (a compile costs a minute or more here): FP8 on, so the
# re-quantisation after each LoRA switch runs compiled too; batches of 2. The compile cache is the
# tests' model home's, shared with tests/test_gpu_bench.py's FP8 row (the same graphs) and kept
# between runs of the suite.
COMPILED = dict(
    device="cpu",
    compile=True,
    fuse_qkv=True,
    channels_last=True,
    fp8=True,
    batch_invariant=False,
    batch_size=2,
    warmup_sizes=("64x64",),
    decode_overlap=True,
)


@pytest.fixture(scope="module")
def compiled(tiny_base, tiny_loras):
    from torch._dynamo.utils import counters

    from app.generator import Generator

    misses = counters["inductor"]["fxgraph_cache_miss"]
    gen = Generator(tiny_base, tiny_loras, ComputeSpec(**COMPILED))
    cold = counters["inductor"]["fxgraph_cache_miss"] > misses  # compiled here, not loaded
    eager = Generator(tiny_base, tiny_loras, ComputeSpec(**{**COMPILED, "compile": False, "warmup_sizes": ()}))
    return gen, eager, graphs(), cold


@pytest.mark.slow
def test_compiled_generator_switches_lora_stacks_without_recompiling(compiled, tiny_base, tiny_loras):
    gen, eager, after_warm_up, _ = compiled
    assert gen.accelerator == "cpu:threads=1+fused_qkv+channels_last+compiled+fp8+batch_bucket=2"
    assert gen.warmup_seconds > 0
    stacks = [(), (("tiny-style", 0.8),), (("tiny-detail", 0.6),), (("tiny-style", 0.5), ("tiny-detail", 1.0)), ()]
    images = []
    for i, stack in enumerate(stacks):
        r = request(tiny_base, tiny_loras, i, stack, seed=7)
        got, want = gen.render([r])[0], eager.render([r])[0]
        assert not got.error, got.error
        # Compiled kernels round FP8's activation scales differently and the tiny LoRAs amplify
        # that (measured with tiny-style: 10 of 255 at most, about 1 on average, where FP8 itself
        # is 2.9 from the exact image and a stale FP8 copy of the weights would be over 10 away).
        diff = np.abs(got.pixels.astype(int) - want.pixels.astype(int))
        assert diff.max() <= 16 and diff.mean() < 2, stack
        images.append(got.pixels)
    assert graphs() == after_warm_up  # five stacks, four switches, no new graph
    assert np.abs(images[1].astype(int) - images[0].astype(int)).mean() > 10  # the FP8 layers followed the stack
    # The weights were restored exactly: the plain image at the end is the plain image at the start.
    assert np.array_equal(images[0], images[-1])

    unfused = gen.render([request(tiny_base, tiny_loras, 9, (("tiny-style", 1.0),), fuse=False)])[0]
    assert unfused.pixels is None and "fuse_loras: true" in unfused.error
    assert graphs() == after_warm_up


@pytest.mark.slow
def test_short_batches_are_padded_to_the_compiled_shape(compiled, tiny_base, tiny_loras):
    gen, _, after_warm_up, _ = compiled
    reqs = [request(tiny_base, tiny_loras, i) for i in range(3)]
    results = {r.image_id: r for r in gen.render(reqs)}
    assert graphs() == after_warm_up  # the lone third image ran padded to 2, not as a new shape
    assert [results[r.image_id].batch_size for r in reqs] == [2, 2, 1]
    # Regenerating the lone image pads it the same way: the same pixels.
    again = gen.render_batch_exactly([reqs[2]])[0]
    assert np.array_equal(again.pixels, results[reqs[2].image_id].pixels)


WARM_START = """
import json, sys
from torch._dynamo.utils import counters
from app.compute import ComputeSpec
from app.generator import Generator
from app.models.catalog import ModelCatalog
catalog = ModelCatalog.load()
gen = Generator(catalog.resolve_base("tiny-sdxl"), {}, ComputeSpec.model_validate_json(sys.argv[1]))
print(json.dumps({"warmup_seconds": gen.warmup_seconds, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "cache": gen.compile_cache}))
"""


@pytest.mark.slow
def test_another_generator_loads_every_graph_from_the_compile_cache(compiled):
    """A second generator process (another actor on the node, or a restarted one) with the same
    settings and cache directory compiles nothing: every graph comes from the first's cache."""
    gen, _, _, cold = compiled
    out = subprocess.run(
        [sys.executable, "-c", WARM_START, ComputeSpec(**COMPILED).model_dump_json()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    second = json.loads(out.stdout.strip().splitlines()[-1])
    assert second["cache"] == gen.compile_cache
    assert second["hits"] > 0 and second["misses"] == 0
    if cold:  # the first compiled for real (a fresh checkout): loading is faster than compiling
        assert second["warmup_seconds"] < gen.warmup_seconds


# --- FP8 ---------------------------------------------------------------------------------------------
def test_fp8_generator_checks_its_error_and_follows_lora_switches(tiny_base, tiny_loras):
    from app.generator import Generator

    exact = Generator(tiny_base, tiny_loras, ComputeSpec(device="cpu", fuse_qkv=True))
    fp8 = Generator(tiny_base, tiny_loras, ComputeSpec(device="cpu", fuse_qkv=True, fp8=True))
    assert fp8.accelerator == "cpu:threads=1+fused_qkv+fp8"
    assert 1e-4 < fp8.stats()["fp8_error"] < 0.02 and fp8.fp8_layers > 0  # measured 0.006
    plain, styled = (
        request(tiny_base, tiny_loras, 1, seed=3),
        request(tiny_base, tiny_loras, 2, (("tiny-style", 0.8),), seed=3),
    )
    first = fp8.render([plain])[0].pixels
    # Close to the exact image, not equal (measured: at most 3 of 255, 0.33 on average).
    diff = np.abs(first.astype(int) - exact.render([plain])[0].pixels.astype(int))
    assert 0 < diff.max() <= 8 and diff.mean() < 1.5
    # A fused stack is re-quantised: FP8 renders the styled image, then the plain one exactly again.
    styled_px = fp8.render([styled])[0].pixels.astype(int)
    assert np.abs(styled_px - exact.render([styled])[0].pixels.astype(int)).mean() < 5  # measured 2.9
    assert np.abs(styled_px - first.astype(int)).mean() > 10
    assert np.array_equal(fp8.render([plain])[0].pixels, first)


def test_fp8_accumulation_setting_reaches_every_layer_and_the_catalog(tiny_base, tiny_loras):
    from app.fp8 import Float8Linear
    from app.generator import Generator
    from app.regenerate import recorded_compute

    gen = Generator(tiny_base, tiny_loras, ComputeSpec(device="cpu", fuse_qkv=True, fp8=True, fp8_fast_accum=False))
    assert gen.accelerator == "cpu:threads=1+fused_qkv+fp8+fp8_fp32_accum"
    # An unfused stack splits the fused QKV layers; the next image fuses them again into new
    # layers, which are quantised with the same setting.
    before = {id(m) for m in gen.pipe.unet.modules() if isinstance(m, Float8Linear)}
    unfused = request(tiny_base, tiny_loras, 2, (("tiny-style", 0.8),), fuse=False, seed=3)
    assert [r.error for r in gen.render([unfused]) + gen.render([request(tiny_base, tiny_loras, 1)])] == ["", ""]
    layers = [m for m in gen.pipe.unet.modules() if isinstance(m, Float8Linear)]
    assert {id(m) for m in layers} != before and not any(m.fast_accum for m in layers)
    recorded = recorded_compute(gen.accelerator, 1)
    assert recorded.fp8 and not recorded.fp8_fast_accum
    default = recorded_compute("cuda:NVIDIA H200+fused_qkv+channels_last+compiled+fp8+batch_bucket=8", 1)
    assert default.fp8 and default.fp8_fast_accum


def test_fp8_above_its_error_limit_refuses_to_start(tiny_base):
    from app.generator import Generator

    with pytest.raises(RuntimeError, match=r"fp8_max_error 1e-06.*fp8: false"):
        Generator(tiny_base, {}, ComputeSpec(device="cpu", fp8=True, fp8_max_error=1e-6))


# --- output, memory, VAE tiling ---------------------------------------------------------------------
def test_uint8_on_device_matches_the_float_arithmetic_and_counts_nonfinite_values():
    import torch

    from app.generator.overlap import uint8_on_device

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1, 0, 0, :4] = float("nan")
    images[1, 2, 7, 7] = float("inf")
    images[0, 1, 3, 3] = 1.7  # out of range: clipped
    pixels, bad = uint8_on_device(images)
    pixels, bad = pixels.numpy(), bad.tolist()
    as_np = images.permute(0, 2, 3, 1).numpy()
    want = (np.clip(np.where(np.isfinite(as_np), as_np, 0.0), 0.0, 1.0) * np.float32(255.0)).round().astype(np.uint8)
    assert pixels.shape == (2, 8, 8, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, want)
    assert bad == [0.0, pytest.approx(5 / 192)]


def tight_memory(pipe, max_images: int):
    """Fault injection: the device has room for `max_images` images per call, as a GPU would."""
    import torch

    class Tight(type(pipe)):
        calls: typing.ClassVar[list] = []

        def __call__(self, *args, **kwargs):
            n = len(kwargs["prompt"])
            type(self).calls.append(n)
            if n > max_images:
                raise torch.OutOfMemoryError(f"CUDA out of memory (test: {n} images > {max_images})")
            return super().__call__(*args, **kwargs)

    pipe.__class__ = Tight
    return Tight.calls


def test_a_batch_that_runs_out_of_memory_is_halved_for_good(tiny_base, tiny_loras):
    import torch

    from app.generator import Generator
    from app.models.loader import load_pipeline, pick_dtype

    pipe = load_pipeline(tiny_base, torch.device("cpu"), pick_dtype(tiny_base.dtype, torch.device("cpu")))
    calls = tight_memory(pipe, 2)
    gen = Generator(tiny_base, tiny_loras, ComputeSpec(device="cpu", batch_invariant=False, batch_size=4), pipe=pipe)
    reqs = [request(tiny_base, tiny_loras, i) for i in range(4)]
    first = gen.render(reqs)
    assert all(not r.error for r in first) and [r.batch_size for r in first] == [2, 2, 2, 2]
    assert calls == [4, 2, 2] and gen.batch_limit == 2
    # Same pixels as a generator sized 2 from the start: the halves are ordinary batches.
    sized = Generator(tiny_base, tiny_loras, ComputeSpec(device="cpu", batch_invariant=False, batch_size=2))
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first, sized.render(reqs)))
    calls.clear()
    gen.render([request(tiny_base, tiny_loras, i) for i in range(4, 8)])
    assert calls == [2, 2]  # no second out-of-memory: the limit stays
    calls.clear()
    tight_memory(pipe, 0)
    lone = gen.render([request(tiny_base, tiny_loras, 9)])[0]
    assert lone.pixels is None and "out of memory at 64x64 for one image" in lone.error


def test_vae_tiles_only_above_the_threshold_and_regenerate_knows(tiny_base):
    from app.generator import Generator
    from app.regenerate import recorded_compute

    plain = Generator(tiny_base, {}, ComputeSpec(device="cpu"))
    tiled = Generator(tiny_base, {}, ComputeSpec(device="cpu", vae_tiling_above=64 * 64))
    assert tiled.accelerator == "cpu:threads=1+vae_tiling_above=4096" and plain.accelerator == "cpu:threads=1"
    assert recorded_compute(tiled.accelerator, 1).vae_tiling_above == 4096
    small = request(tiny_base, {}, 1)
    assert np.array_equal(plain.render([small])[0].pixels, tiled.render([small])[0].pixels)  # 64x64: not above
    big = dataclasses.replace(small, image_id="big", width=256, height=256)
    a, b = plain.render([big])[0].pixels.astype(int), tiled.render([big])[0].pixels.astype(int)
    assert 0 < np.abs(a - b).mean() < 20  # tiles blended at their seams: close, not equal


def test_the_bulk_job_warms_compiled_generators_up_for_the_sizes_its_rows_use():
    from jobs.pools import with_warmup_sizes

    def sized(i: int, width: int, height: int) -> RenderRequest:
        return RenderRequest(f"{i}", "p", "", {"name": "b"}, (), "euler", 2, 5.0, width, height, i)

    rows = requests_to_arrow([sized(0, 1024, 1024), sized(1, 832, 1216), sized(2, 1024, 1024)])
    compiled = with_warmup_sizes(ComputeSpec(compile=True), rows)
    assert compiled.warmup_sizes == ("832x1216", "1024x1024")
    listed = ComputeSpec(compile=True, warmup_sizes=("512x512",))
    assert with_warmup_sizes(listed, rows) is listed  # the spec's own list wins
    eager = ComputeSpec()
    assert with_warmup_sizes(eager, rows) is eager  # nothing to compile


# --- LoRAs with text-encoder parts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder_loras(tiny_base, tmp_path_factory):
    """Two LoRAs with the same random UNet part, one with a text-encoder part too (as many SDXL
    LoRAs have), written with `save_lora_weights` like a trained one."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from app.models.catalog import ResolvedModel
    from app.models.loader import load_pipeline
    from app.models.tiny import LORA_TARGETS

    pipe = load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    torch.manual_seed(11)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(LORA_TARGETS)))
    pipe.text_encoder.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
        )
    )
    unet_part = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    te_part = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
    found = {}
    for name, parts in (("unet-only", {}), ("with-te", {"text_encoder_lora_layers": te_part})):
        folder = tmp_path_factory.mktemp(name)
        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=unet_part, safe_serialization=True, **parts
        )
        found[name] = ResolvedModel(
            name=name,
            kind="lora",
            version="1",
            source=str(folder),
            path=str(folder),
            sha256=name.ljust(64, "0"),
            arch=tiny_base.arch,
            weight_name="pytorch_lora_weights.safetensors",
        )
    return found


def test_text_encoder_parts_of_a_lora_apply_fused_unfused_and_beside_a_compiled_unet(tiny_base, text_encoder_loras):
    from app.generator import Generator

    loras = text_encoder_loras

    def render(gen, name, fuse):
        return gen.render([request(tiny_base, loras, 1, ((name, 0.9),), fuse=fuse, seed=4)])[0].pixels.astype(int)

    gen = Generator(tiny_base, loras, ComputeSpec(device="cpu", fuse_qkv=True))
    unet_only, with_te = render(gen, "unet-only", True), render(gen, "with-te", True)
    assert np.abs(with_te - unet_only).mean() > 1  # the text-encoder part changed the conditioning
    assert np.abs(render(gen, "with-te", False) - with_te).max() <= 2  # unfused: the same image
    # The UNet-merging mode a compiled generator uses (peft layers leave the UNet): same image.
    merging = Generator(tiny_base, loras, ComputeSpec(device="cpu", fuse_qkv=True))
    merging.switcher.unet_adapters = False
    assert np.array_equal(render(merging, "with-te", True), with_te)
    assert not getattr(merging.pipe.unet, "peft_config", None)  # no peft layer left in the UNet
    assert np.array_equal(render(merging, "unet-only", True), unet_only)  # text encoder adapter off again
