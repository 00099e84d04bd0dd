"""FP8 Linear layers (app/fp8.py) on CPU: single layers, the tiny SDXL UNet, LoRA fusing, torch.compile.

`torch._scaled_mm` runs float8_e4m3fn on CPU, so these run the same code a GPU runs, only slowly.
Tolerances are measured values with margin: one e4m3 Linear on random data gives a relative error
of 0.033-0.036 (20 seeds, float32 and bfloat16); the tiny UNet's output moves by 0.0063. The tiny
LoRAs are far stronger than real ones (tiny-style triples the weights it touches) and make the
tiny UNet sensitive: 3% random noise on each transformer Linear's output, in float32 without any
FP8, moves its output by 0.0057 alone, 0.050 with tiny-style fused and 0.62 with tiny-detail, so
the LoRA tests use tiny-style and wider tolerances; each layer's own FP8 error stays 0.03-0.05.
"""

from __future__ import annotations

import pytest
import torch

from app.fp8 import Float8Linear, fp8_supported, fp8_unsupported_reason, quantize_linears, refresh_all, relative_error
from app.models.tiny import LORA_TARGETS

LINEAR_TOL = 0.05  # measured 0.033-0.036
UNET_TOL = 0.02  # measured 0.0063
UNFUSED_LORA_TOL = 0.1  # measured 0.051: FP8 base layers, tiny-style beside them in float32
FUSED_LORA_TOL = 0.25  # measured 0.161: tiny-style fused into the weights, then quantised with them
QUANTISED_AT_LEAST = 1e-4  # below this the FP8 path did not run


def random_linear(in_features: int, out_features: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features).to(dtype)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    return lin


def unet_inputs(batch: int = 2) -> dict:
    """Fixed latents and conditioning for the tiny UNet: sample [B, 4, 16, 16] (a 128x128 image)."""
    g = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, 80, generator=g),
        added_cond_kwargs=dict(
            text_embeds=torch.randn(batch, 32, generator=g),
            time_ids=torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * batch),
        ),
    )


@torch.no_grad()
def unet_output(pipe) -> torch.Tensor:
    return pipe.unet(**unet_inputs()).sample


def load_cpu(base):
    from app.models.loader import load_pipeline

    return load_pipeline(base, torch.device("cpu"), torch.float32)


def load_lora(pipe, lora, name: str = "style") -> None:
    pipe.load_lora_weights(lora.path, weight_name=lora.weight_name, adapter_name=name, use_safetensors=True)


@pytest.fixture
def pipe(tiny_base):
    """A fresh float32 tiny-sdxl pipeline per test: quantising changes its UNet."""
    return load_cpu(tiny_base)


@pytest.fixture(scope="module")
def reference(tiny_base, tiny_loras):
    """The unquantised UNet's output, without LoRA and with tiny-style fused into it."""
    pipe = load_cpu(tiny_base)
    plain = unet_output(pipe)
    load_lora(pipe, tiny_loras["tiny-style"])
    pipe.fuse_lora(components=["unet"])
    return {"plain": plain, "fused": unet_output(pipe)}


# --- 1. one layer ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 64), (3, 7, 64), (2, 3, 5, 64)])
def test_float8_linear_is_the_linear_within_e4m3_error(dtype, shape):
    lin = random_linear(64, 48, dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        ref = lin(x)
        weight, bias = lin.weight, lin.bias
        fp8 = Float8Linear.convert_(lin)
        out = fp8(x)
    assert fp8 is lin and fp8.weight is weight and fp8.bias is bias
    assert out.shape == (*shape[:-1], 48) and out.dtype == dtype
    assert QUANTISED_AT_LEAST < relative_error(ref, out) < LINEAR_TOL
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_fp8.shape == (48, 64)
    assert fp8.weight_fp8.is_contiguous() and fp8.weight_scale.shape == (1, 48)


def test_bias_is_added_to_the_fp8_matmul_in_full_precision():
    lin = Float8Linear.convert_(random_linear(32, 16, torch.float32))
    x = torch.randn(4, 32)
    with torch.no_grad():
        with_bias = lin(x)
        bias, lin.bias = lin.bias, None
        without_bias = lin(x)
    torch.testing.assert_close(with_bias - without_bias, bias.expand(4, 16))


def test_constructed_float8_linear_quantises_its_own_weight():
    assert fp8_supported(torch.device("cpu"))
    torch.manual_seed(0)
    layer = Float8Linear(32, 64, bias=False)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert relative_error(x @ layer.weight.t(), layer(x)) < LINEAR_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_runs_a_row_wise_scaled_matmul_on_the_cpu(dtype):
    # torch 2.14's CPU kernel takes row-wise scales (2.11's took per-tensor ones only, and the
    # probe said so: "cannot run row-wise scaled FP8 matmuls on cpu ... per-tensor scaling").
    assert fp8_unsupported_reason(torch.device("cpu"), dtype) is None
    assert fp8_supported(torch.device("cpu"), dtype)


def test_the_probe_names_what_it_cannot_use():
    assert "not meta" in fp8_unsupported_reason(torch.device("meta"))
    assert "torch.int32 outputs" in fp8_unsupported_reason(torch.device("cpu"), torch.int32)
    assert not fp8_supported(torch.device("cpu"), torch.float8_e4m3fn)


class _TransformerFeedForward(torch.nn.Module):
    """The two places SDXL's FP8 inputs come from: a LayerNorm (before to_qkv) and GEGLU (before ff.net.2)."""

    def __init__(self, c: int = 64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(c)
        self.to_qkv = torch.nn.Linear(c, 3 * c, bias=False)
        self.geglu = torch.nn.Linear(c, 8 * c)
        self.out = torch.nn.Linear(4 * c, c)

    def forward(self, x):
        qkv = self.to_qkv(self.norm(x))
        a, gate = self.geglu(x).chunk(2, dim=-1)
        return qkv.sum(-1, keepdim=True) + self.out(a * torch.nn.functional.gelu(gate))


def test_fast_accumulation_is_set_on_every_selected_layer_and_reaches_the_matmul():
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScaledMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fast = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._scaled_mm.default:
                self.fast.append(kwargs.get("use_fast_accum", args[7] if len(args) > 7 else False))
            return func(*args, **kwargs)

    block = _TransformerFeedForward()
    report = quantize_linears(block, include="to_qkv")
    assert block.to_qkv.fast_accum and "fast_accum=True" in repr(block.to_qkv)
    # Converting more layers sets the flag on the earlier ones too: one setting per module.
    quantize_linears(block, include="", fast_accum=False)
    assert report.converted == ("to_qkv",) and not any(m.fast_accum for m in (block.to_qkv, block.geglu, block.out))
    x = torch.randn(2, 8, 64)
    with torch.no_grad(), ScaledMatmuls() as calls:
        block(x)
    assert calls.fast == [False, False, False]
    quantize_linears(block, include="")
    with torch.no_grad(), ScaledMatmuls() as calls:
        block(x)
    assert calls.fast == [True, True, True]


def test_unaligned_sizes_are_refused_with_both_numbers():
    with pytest.raises(ValueError, match="20 and 32"):
        Float8Linear(20, 32)
    with pytest.raises(TypeError, match="Conv2d"):
        Float8Linear.convert_(torch.nn.Conv2d(16, 16, 1))


def test_refresh_follows_the_master_weight_in_the_same_buffers():
    lin = Float8Linear.convert_(random_linear(64, 32, torch.float32))
    x = torch.randn(6, 64)
    ptrs = (lin.weight_fp8.data_ptr(), lin.weight_scale.data_ptr())
    buffers = (lin.weight_fp8, lin.weight_scale)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(-2.0)  # what LoRA fusing does: the master changes in place
        stale = lin(x)
        lin.refresh()
        after = lin(x)
    assert torch.equal(stale, before)  # the matmul reads the FP8 copy, not the master
    assert relative_error(-2.0 * before + 3.0 * lin.bias, after) < 1e-6  # e4m3 rounding is sign- and scale-symmetric
    assert (lin.weight_fp8.data_ptr(), lin.weight_scale.data_ptr()) == ptrs
    assert lin.weight_fp8 is buffers[0] and lin.weight_scale is buffers[1]


def test_under_autograd_the_exact_linear_runs_and_differentiates():
    lin = random_linear(32, 16, torch.float32)
    x = torch.randn(3, 32, requires_grad=True)
    expected = lin(x)
    fp8 = Float8Linear.convert_(lin)
    out = fp8(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad is not None and fp8.weight.grad is not None


def test_dtype_casts_keep_fp8_buffers_and_state_dicts_stay_plain():
    lin = Float8Linear.convert_(random_linear(64, 32, torch.float32))
    keys = set(lin.state_dict())
    assert keys == {"weight", "bias"}

    lin.to(torch.bfloat16)
    assert lin.weight.dtype == torch.bfloat16 and lin.weight_fp8.dtype == torch.float8_e4m3fn
    assert lin.weight_scale.dtype == torch.float32
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(torch.nn.functional.linear(x, lin.weight, lin.bias), lin(x)) < LINEAR_TOL

    other = random_linear(64, 32, torch.bfloat16, seed=1)
    lin.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert relative_error(other(x), lin(x)) < LINEAR_TOL  # loading refreshed the FP8 copy


def test_selection_skips_unaligned_narrow_and_unmatched_layers():
    model = torch.nn.ModuleDict(
        {
            "wide": torch.nn.Linear(64, 64),
            "odd": torch.nn.Linear(20, 64),
            "narrow": torch.nn.Linear(64, 16),
            "conv": torch.nn.Conv2d(64, 64, 1),
        }
    )
    report = quantize_linears(model, include="", min_features=32)
    assert report.converted == ("wide",)
    assert "multiples of 16" in report.skipped["odd"] and "20->64" in report.skipped["odd"]
    assert "min_features=32" in report.skipped["narrow"]
    assert "conv" not in report.skipped
    assert report.parameters_covered == 64 * 64
    assert report.linear_parameters == 64 * 64 + 20 * 64 + 64 * 16
    assert type(model["odd"]) is torch.nn.Linear and isinstance(model["wide"], Float8Linear)
    with pytest.raises(ValueError, match="min_features"):
        quantize_linears(model, min_features=0)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref, torch.tensor([3.0, 5.0])) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        relative_error(ref, torch.zeros(3))


# --- 2. the tiny SDXL UNet ----------------------------------------------------------------------
def test_tiny_unet_in_fp8_stays_close_to_float32(pipe, reference):
    params = {n: p for n, p in pipe.unet.named_parameters()}

    report = quantize_linears(pipe.unet)
    out = unet_output(pipe)

    # Every transformer block Linear, nothing else: 6 transformers x 2 blocks x 10 layers.
    assert len(report.converted) == report.layers == 120
    leaves = {n.split("transformer_blocks.")[1].split(".", 1)[1] for n in report.converted}
    assert leaves == {
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    }
    assert {
        "time_embedding.linear_1",
        "add_embedding.linear_1",
        "mid_block.attentions.0.proj_in",
        "mid_block.attentions.0.proj_out",
        "down_blocks.0.resnets.0.time_emb_proj",
    } <= set(report.skipped)
    assert report.share == pytest.approx(report.parameters_covered / report.linear_parameters)
    assert 0.8 < report.share < 0.9  # measured 0.853; proj_in/out and embeddings are the rest
    after = dict(pipe.unet.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is p for n, p in params.items())  # same objects

    error = relative_error(reference["plain"], out)
    assert QUANTISED_AT_LEAST < error < UNET_TOL

    again = quantize_linears(pipe.unet)
    assert again.converted == () and again.layers == report.layers and again.share == report.share
    assert torch.equal(unet_output(pipe), out)


def test_quantising_after_qkv_fusion_converts_the_fused_layers_to_the_same_numbers(pipe):
    quantize_linears(pipe.unet)
    separate = unet_output(pipe)

    pipe.fuse_qkv_projections()
    plain_fused = unet_output(pipe)  # the new to_qkv / to_kv are plain Linear until quantised
    report = quantize_linears(pipe.unet)
    fused = unet_output(pipe)

    assert len(report.converted) == 24 and {n.rsplit(".", 1)[1] for n in report.converted} == {"to_qkv", "to_kv"}
    assert relative_error(separate, plain_fused) > QUANTISED_AT_LEAST
    # Row-wise weight scales and per-row activation scales: fusing and quantising commute.
    assert relative_error(separate, fused) < 1e-5


# --- 3. LoRA ----------------------------------------------------------------------------------------
def test_lora_fused_into_a_quantised_unet_takes_effect_after_refresh(pipe, reference, tiny_loras):
    from peft.tuners.tuners_utils import BaseTunerLayer

    quantize_linears(pipe.unet)
    fp8_plain = unet_output(pipe)
    to_q = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q

    load_lora(pipe, tiny_loras["tiny-style"])
    wrapped = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(wrapped, BaseTunerLayer) and wrapped.get_base_layer() is to_q
    # Unfused, the adapter runs beside the FP8 base layer in full precision.
    assert relative_error(reference["fused"], unet_output(pipe)) < UNFUSED_LORA_TOL

    pipe.fuse_lora(components=["unet"])
    stale = unet_output(pipe)
    refreshed = refresh_all(pipe.unet)
    fused = unet_output(pipe)

    assert torch.equal(stale, fp8_plain)  # fusing rewrote the masters; the FP8 copies wait for refresh
    assert refreshed == 120
    to_fused, to_plain = relative_error(reference["fused"], fused), relative_error(reference["plain"], fused)
    assert QUANTISED_AT_LEAST < to_fused < FUSED_LORA_TOL and to_fused < to_plain / 3  # measured 0.16 and 0.79

    # Unfusing subtracts the delta again, up to float32 rounding (which can move a few FP8 values
    # by one step: measured 0.0021); after a refresh the UNet is back to its FP8 self.
    pipe.unfuse_lora(components=["unet"])
    pipe.disable_lora()
    refresh_all(pipe.unet)
    assert relative_error(fp8_plain, unet_output(pipe)) < 0.01
    # Removing peft's layers puts the base layers back: the same FP8 modules.
    pipe.unet.unload_lora()
    assert pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q is to_q


def test_quantising_a_unet_with_loras_loaded_converts_base_layers_only(pipe, reference, tiny_loras):
    load_lora(pipe, tiny_loras["tiny-style"])
    report = quantize_linears(pipe.unet)

    # peft wraps the LoRA targets; their base layers are converted in place, the rest as usual.
    assert len(report.converted) == 120
    wrapped = {n for n in report.converted if n.endswith(".base_layer")}
    assert wrapped == {n for n in report.converted if n.removesuffix(".base_layer").endswith(LORA_TARGETS)}
    assert len(wrapped) == 6 * 2 * 8
    assert not any(".lora_" in n for n in report.converted)
    assert any(reason == "LoRA adapter weights" for reason in report.skipped.values())
    assert relative_error(reference["fused"], unet_output(pipe)) < UNFUSED_LORA_TOL


# --- 4. torch.compile ---------------------------------------------------------------------------
class _Block(torch.nn.Module):
    """LayerNorm -> Linear -> GELU: the activation quantisation has a kernel to fuse into."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.proj = torch.nn.Linear(64, 32)

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(self.norm(x)))


def test_compiled_float8_linear_does_not_recompile_after_refresh():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    block = _Block()
    quantize_linears(block, include="proj")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter)
    x = torch.randn(2, 5, 64)

    with torch.no_grad():
        first = compiled(x)
        assert relative_error(block(x), first) < 1e-5
        block.proj.weight.mul_(-1.0)
        block.proj.refresh()
        second = compiled(x)
        expected = block(x)
    assert counter.frame_count == 1
    assert relative_error(expected, second) < 1e-5 and relative_error(first, second) > 0.1


def test_inductor_fuses_the_activation_quantisation_into_the_kernels_before_it():
    # FP8 only pays if quantising the activations costs no pass of its own (unfused it is slower
    # than bf16 on H100/H200). Inductor's CPU backend here; the GPU's Triton backend shares the
    # scheduler that decides these fusions, and the GPU benchmark's profile shows its kernels.
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    block = _TransformerFeedForward().eval()
    quantize_linears(block, include="")
    x = torch.randn(2, 256, 64)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(block), x)
        assert relative_error(block(x), out) < 1e-5
    code = "\n".join(codes)
    kernels = re.findall(r"^(cpp_fused_\w+) = ", code, re.M)
    # The matmuls themselves stay torch's (extern), with the layers' fast accumulation.
    assert re.findall(r"_scaled_mm\(.*use_fast_accum=(\w+)", code) == ["True"] * 3
    # The row-wise amax and the e4m3 cast ride in the LayerNorm's kernel and in GEGLU's kernel.
    assert any("native_layer_norm" in k and "amax" in k for k in kernels), kernels
    assert any("gelu" in k and "amax" in k for k in kernels), kernels
    assert not [k for k in kernels if "amax" in k and not re.search("layer_norm|gelu", k)], kernels
