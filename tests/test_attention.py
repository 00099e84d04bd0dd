"""compute.attention (app/attention.py): the attention kernel tried first, on the CPU.

Torch's CPU has two of the four kernels (its fused "flash" kernel and "math"), so the choices run
end to end here with those two: which aten kernel a render actually calls is read off the
profiler, eager and compiled. cuDNN's and the memory-efficient kernels exist only on CUDA; here
they must be refused at actor start with the reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.profiler import profile

from app.attention import attention_kernels, attention_unsupported_reason, cache_folder, kernel_order
from app.compute import ComputeSpec
from app.request import RenderRequest

FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"


def request(base, i: int = 0) -> RenderRequest:
    return RenderRequest(
        image_id=f"att{i:03d}",
        prompt="a red shoe",
        negative_prompt="",
        base_model=base.lineage(),
        loras=(),
        scheduler="euler",
        steps=2,
        guidance=5.0,
        width=64,
        height=64,
        seed=i,
    )


def kernels_called(fn) -> Counter[str]:
    """The aten attention kernels `fn` runs, with their calls (compiled graphs call the fused one
    as an extern kernel; a graph traced to the math kernel calls its matmuls instead)."""
    with profile() as prof:
        fn()
    return Counter(e.name for e in prof.events() if "dot_product" in e.name)


def test_each_choice_turns_on_itself_and_the_kernels_after_it():
    assert kernel_order("auto") == []
    assert kernel_order("cudnn") == ["cudnn", "flash", "efficient", "math"]
    assert kernel_order("efficient") == ["efficient", "math"]
    assert kernel_order("math") == ["math"]
    with pytest.raises(ValueError, match="'fa3'.*auto, cudnn, flash, efficient, math"):
        kernel_order("fa3")
    assert cache_folder("auto") == "" and cache_folder("cudnn") == "attention-cudnn"


def test_the_context_selects_the_kernel_and_restores_torch_s_own_order():
    from torch.nn.attention import _cur_sdpa_kernel_backends

    before = _cur_sdpa_kernel_backends(with_priority=True)
    q = torch.randn(1, 2, 32, 16)
    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert FLASH_CPU in kernels_called(call)
    with attention_kernels("math"):
        assert MATH in kernels_called(call) and FLASH_CPU not in kernels_called(call)
    with attention_kernels("flash"):
        assert FLASH_CPU in kernels_called(call)
    with attention_kernels("auto"):
        assert _cur_sdpa_kernel_backends(with_priority=True) == before
    assert _cur_sdpa_kernel_backends(with_priority=True) == before


def test_kernels_this_device_lacks_are_named_with_the_device():
    cpu = torch.device("cpu")
    assert attention_unsupported_reason("auto", cpu, torch.float32) is None
    assert attention_unsupported_reason("math", cpu, torch.bfloat16) is None
    assert attention_unsupported_reason("flash", cpu, torch.float32) is None
    for choice in ("cudnn", "efficient"):
        why = attention_unsupported_reason(choice, cpu, torch.float32)
        assert why and why.startswith(f"the {choice} attention kernel cannot run on cpu in torch.float32: ")


def test_a_generator_refuses_a_kernel_its_device_lacks(tiny_base):
    from app.generator import Generator

    with pytest.raises(
        RuntimeError, match=r'compute.attention=cudnn: the cudnn attention kernel cannot run on cpu.*"auto"'
    ):
        Generator(tiny_base, {}, ComputeSpec(device="cpu", attention="cudnn"))


def test_the_choice_reaches_every_attention_call_and_the_catalog(tiny_base):
    from app.generator import Generator
    from app.regenerate import recorded_compute

    auto = Generator(tiny_base, {}, ComputeSpec(device="cpu"))
    math = Generator(tiny_base, {}, ComputeSpec(device="cpu", attention="math"))
    assert math.accelerator == "cpu:threads=1+attention=math" and auto.accelerator == "cpu:threads=1"
    assert recorded_compute(math.accelerator, 1).attention == "math"
    assert recorded_compute(auto.accelerator, 1).attention == "auto"
    got = {}
    for name, gen in (("auto", auto), ("math", math)):
        results = []
        called = kernels_called(lambda: results.extend(gen.render([request(tiny_base)])))  # noqa: B023
        assert not results[0].error
        got[name] = (called, results[0].pixels)
    assert FLASH_CPU in got["auto"][0] and MATH not in got["auto"][0]
    assert MATH in got["math"][0] and FLASH_CPU not in got["math"][0]
    # The same arithmetic, summed in another order: float32 rounding apart.
    assert np.abs(got["auto"][1].astype(int) - got["math"][1].astype(int)).max() <= 1


@pytest.mark.slow
def test_a_compiled_generator_keeps_its_choice_in_its_graphs_and_its_own_cache(tiny_base, monkeypatch):
    """Compiled graphs keep the kernel they were traced with, and inductor's cache keys do not
    see the choice: each choice compiles into a folder of its own, so an "auto" generator on the
    same cache never loads a graph traced to the math kernel. (The tests' model home's cache, kept
    between runs: the second run loads both generators' graphs, each from its own folder.)

    The settings of tests/test_gpu_bench.py's compiled rows (fused QKV, channels_last, batches of
    2), whose "imagefab compiled" row (test_every_variant) and "math" row (the attention test)
    compile these same graphs into the same cache: the file that runs second loads them, or waits
    for the first's compile (Generator's warm-up lock)."""
    import os

    from torch._dynamo.utils import counters

    from app.generator import Generator

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))  # put back after
    # A fresh process's dynamo, as an actor's: an earlier test's generator in this worker may have
    # left graphs of these very shapes traced under another choice, which dynamo's guards (blind
    # to the choice, like inductor's keys) would hand to the generators here.
    torch._dynamo.reset()
    spec = dict(
        device="cpu",
        compile=True,
        fuse_qkv=True,
        channels_last=True,
        batch_invariant=False,
        batch_size=2,
        decode_overlap=True,
        warmup_sizes=("64x64",),
    )
    math = Generator(tiny_base, {}, ComputeSpec(**spec, attention="math"))
    math_called = kernels_called(lambda: math.render([request(tiny_base, 1)]))
    # The next generator in a process of its own, as an actor is: dynamo's guards do not see the
    # choice either, and would hand it the math generator's graphs (the text encoders, not
    # compiled, would still call the fused kernel, so their calls alone prove nothing).
    torch._dynamo.reset()
    graphs = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
    auto = Generator(tiny_base, {}, ComputeSpec(**spec))
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] == graphs + 2
    assert math.compile_cache.endswith("/attention-math") and auto.compile_cache == math.compile_cache.rsplit("/", 1)[0]
    auto_called = kernels_called(lambda: auto.render([request(tiny_base, 1)]))
    assert FLASH_CPU not in math_called  # traced to the math kernel's matmuls
    # The math render's math-kernel calls are its text encoders' (eager): the auto render calls
    # the fused kernel that often there, and again from its compiled UNet and VAE.
    assert math_called[MATH] > 0 and auto_called[FLASH_CPU] > math_called[MATH]
