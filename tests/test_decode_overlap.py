"""Decoding one batch while the next denoises: the generator denoises to latents,
decodes them itself (on a second CUDA stream on a GPU) and collects each batch's pixels only once
the next batch is queued. On the CPU nothing runs in parallel, but the same code path runs: these
tests check that the split decode gives the pipeline's own pixels, that deferred collecting keeps
every image with its own batch, and what happens when memory runs out with a batch in flight."""

from __future__ import annotations

import time
import typing

import numpy as np
import torch

from app.compute import ComputeSpec
from app.request import LoraRef, RenderRequest


def request(base, loras, i: int, stack=(), seed: int | None = None, size: int = 64) -> RenderRequest:
    uses = tuple(LoraRef(name=n, version=loras[n].version, weight=w, sha256=loras[n].sha256) for n, w in stack)
    return RenderRequest(
        image_id=f"img{i:03d}",
        prompt=f"a red shoe {i}",
        negative_prompt="",
        base_model=base.lineage(),
        loras=uses,
        scheduler="euler",
        steps=2,
        guidance=5.0,
        width=size,
        height=size,
        seed=i if seed is None else seed,
    )


def stock_pixels(pipe, r: RenderRequest) -> np.ndarray:
    """The pipeline decoding its own latents (output_type="pt"), rounded as the generator rounds."""
    from app.generator.overlap import uint8_on_device

    with torch.inference_mode():
        out = pipe(
            prompt=[r.prompt],
            num_inference_steps=r.steps,
            guidance_scale=r.guidance,
            width=r.width,
            height=r.height,
            generator=[torch.Generator("cpu").manual_seed(r.seed)],
            output_type="pt",
        ).images
    return uint8_on_device(out)[0][0].numpy()


def test_the_generators_own_decode_gives_the_pipelines_pixels(tiny_base):
    # app/generator/vae_decode.py copies diffusers' decode steps: a new diffusers release that
    # changes them shows up here.
    from app.generator import Generator
    from app.models.loader import load_pipeline, make_scheduler, pick_dtype

    cpu = torch.device("cpu")
    gen = Generator(tiny_base, {}, ComputeSpec(device="cpu"))
    stock = load_pipeline(tiny_base, cpu, pick_dtype(tiny_base.dtype, cpu))
    stock.scheduler = make_scheduler("euler", stock.scheduler.config)
    r = request(tiny_base, {}, 1)
    plain = gen.render([r])[0].pixels
    assert np.array_equal(plain, stock_pixels(stock, r))
    # VAEs with latent statistics (SDXL's has none; Playground v2.5's has) are denormalised the same way.
    for pipe in (gen.pipe, stock):
        pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[0.9, 1.1, 1.0, 0.8])
    with_stats = gen.render([r])[0].pixels
    assert np.array_equal(with_stats, stock_pixels(stock, r))
    assert np.abs(with_stats.astype(int) - plain.astype(int)).mean() > 1  # the statistics were applied


def test_deferred_collecting_keeps_each_image_with_its_batch(tiny_base, tiny_loras):
    from app.generator import Generator

    spec = dict(device="cpu", batch_invariant=False, batch_size=2)
    serial = Generator(tiny_base, tiny_loras, ComputeSpec(**spec))
    deferred = Generator(tiny_base, tiny_loras, ComputeSpec(**spec, decode_overlap=True))
    assert deferred.overlap_decode and not serial.overlap_decode and deferred.decode_stream is None  # no CUDA here
    # Two LoRA stacks (two groups), odd sizes: the last batch of one group is still in flight
    # while the next group's stack is switched in.
    reqs = [request(tiny_base, tiny_loras, i) for i in range(3)]
    reqs += [request(tiny_base, tiny_loras, i, (("tiny-style", 0.8),)) for i in range(3, 6)]
    want = {r.image_id: r for r in serial.render(reqs)}
    t0 = time.perf_counter()
    got = deferred.render(reqs)
    wall = time.perf_counter() - t0
    assert sorted(r.image_id for r in got) == sorted(want)
    for r in got:
        w = want[r.image_id]
        assert not r.error, r.error
        assert (r.batch_id, r.batch_size) == (w.batch_id, w.batch_size)
        assert np.array_equal(r.pixels, w.pixels), r.image_id
    assert sorted(r.batch_size for r in got) == [1, 1, 2, 2, 2, 2]
    # Device time is shared out without counting overlapping batches twice.
    assert 0 < sum(r.gpu_seconds for r in got) <= wall
    # Recorded batches, back to back, are the same batches.
    batches = [
        [r for r in reqs[:3] if want[r.image_id].batch_id == b] for b in {want[r.image_id].batch_id for r in reqs[:3]}
    ]
    again = deferred.render_batches(batches)
    assert all(np.array_equal(r.pixels, want[r.image_id].pixels) for r in again) and len(again) == 3


def fail_once_at(pipe, call: int):
    """Fault injection: the pipeline's `call`-th call runs out of memory, as a GPU would with a
    decode still holding memory beside it; every other call renders."""

    class Flaky(type(pipe)):
        calls: typing.ClassVar[list] = []

        def __call__(self, *args, **kwargs):
            type(self).calls.append(len(kwargs["prompt"]))
            if len(type(self).calls) == call:
                raise torch.OutOfMemoryError("CUDA out of memory (test: a decode in flight)")
            return super().__call__(*args, **kwargs)

    pipe.__class__ = Flaky
    return Flaky.calls


def test_out_of_memory_beside_a_batch_in_flight_stops_overlapping_not_the_batch_size(tiny_base, tiny_loras):
    from app.generator import Generator
    from app.models.loader import load_pipeline, pick_dtype

    cpu = torch.device("cpu")
    pipe = load_pipeline(tiny_base, cpu, pick_dtype(tiny_base.dtype, cpu))
    calls = fail_once_at(pipe, 2)
    gen = Generator(
        tiny_base,
        tiny_loras,
        ComputeSpec(device="cpu", batch_invariant=False, batch_size=2, decode_overlap=True),
        pipe=pipe,
    )
    reqs = [request(tiny_base, tiny_loras, i) for i in range(6)]
    results = gen.render(reqs)
    assert all(not r.error for r in results) and [r.batch_size for r in results] == [2] * 6
    # The first batch was collected, the second tried again alone, the third not overlapped.
    assert calls == [2, 2, 2, 2] and gen.batch_limit == 2 and not gen.overlap_decode
    reference = Generator(tiny_base, tiny_loras, ComputeSpec(device="cpu", batch_invariant=False, batch_size=2))
    want = {r.image_id: r.pixels for r in reference.render(reqs)}
    assert all(np.array_equal(r.pixels, want[r.image_id]) for r in results)
    # A recorded batch that does not fit alone fails whole (regenerate must not split it), named.
    calls.clear()
    fail_once_at(pipe, 1)
    failed = gen.render_batch_exactly(reqs[:2])
    assert [r.image_id for r in failed] == [r.image_id for r in reqs[:2]]
    assert all(r.pixels is None and "out of memory at 64x64 for a recorded batch of 2" in r.error for r in failed)


def test_decodes_overlap_by_default_on_cuda_only_and_whole_batches_come_two_to_a_call():
    from jobs.pools import generator_call_rows

    assert ComputeSpec().overlaps_decode(on_cuda=True) and not ComputeSpec().overlaps_decode(on_cuda=False)
    assert ComputeSpec(decode_overlap=True).overlaps_decode(on_cuda=False)
    assert not ComputeSpec(decode_overlap=False).overlaps_decode(on_cuda=True)
    # Compile modes that capture CUDA graphs keep to one stream unless told (not yet measured with two).
    assert not ComputeSpec(compile=True, compile_mode="max-autotune").overlaps_decode(on_cuda=True)
    assert ComputeSpec(compile=True).overlaps_decode(on_cuda=True)

    whole = ComputeSpec(batch_invariant=False, batch_size=8)
    assert generator_call_rows(whole, use_gpu=True) == 16
    assert generator_call_rows(whole, use_gpu=False) == 8
    assert generator_call_rows(whole.model_copy(update={"decode_overlap": False}), use_gpu=True) == 8
    assert generator_call_rows(ComputeSpec(batch_size=8), use_gpu=True) == 8  # already 8 one-image batches
