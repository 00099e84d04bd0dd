"""Decoding one batch while the next denoises (`compute.decode_overlap`, on for CUDA).

Batch k's decode, its uint8 conversion and the copy of its pixels into pinned host memory are
queued on a second CUDA stream behind an event (`DecodeOverlap.start`); the batch is collected
(the event waited for) only once batch k+1's denoising is queued (`DecodeOverlap.collect`), so the
GPU does not wait for the host between batches. Device time per image is the wall time between
collections, so overlapping batches are not counted twice. On the CPU there is no second stream:
only the collecting is deferred (the same code path, tested).

Out of memory beside a batch in flight finishes that batch and turns the overlap off for the
generator's life (`DecodeOverlap.stop`), not the batch size (see `Generator._render_chunks`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from app.request import RenderRequest


def uint8_on_device(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 and each image's share of non-finite
    values (replaced by 0), computed where the images are: on a GPU only a quarter of the float32
    bytes cross to the host, and the host's ~11 ms per 1024² image of numpy work goes away.
    Same arithmetic as the float32 numpy it replaces (float32 multiply, round half to even)."""
    x = images.float()
    finite = torch.isfinite(x)
    bad = 1.0 - finite.flatten(1).float().mean(dim=1)
    x = torch.where(finite, x, 0.0).clamp_(0.0, 1.0).mul_(255.0).round_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous(), bad


@dataclass
class InFlight:
    """A batch whose denoising is queued and whose decode may still be running (its own stream)."""

    chunk: list[RenderRequest]
    batch_id: str = ""
    started: float = 0.0
    pixels: torch.Tensor | None = None  # [B, H, W, 3] uint8 on the host (pinned: written by a copy in flight)
    bad: torch.Tensor | None = None  # [B] share of non-finite values, on the host
    done: torch.cuda.Event | None = None  # recorded after the copies; None: already on the host
    error: str = ""  # the chunk failed before anything was queued: every image's error


class DecodeOverlap:
    """The decode stream of one generator and the batch collecting that shares its device time out."""

    def __init__(self, device: torch.device, on: bool):
        self.device = device
        self.on = on
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and on else None
        self._last_done = 0.0  # when the last batch's pixels reached the host

    def stop(self) -> None:
        """Decode each batch before the next one starts, for the generator's life."""
        self.on = False

    def start(
        self,
        chunk: list[RenderRequest],
        batch_id: str,
        started: float,
        latents: torch.Tensor,
        decode: Callable[[torch.Tensor], torch.Tensor],
    ) -> InFlight:
        """Queue `decode(latents)` ([B, 3, H, W] in [0, 1]), its uint8 conversion and the copy of
        its pixels to the host: on the decode stream when there is one, else done here."""
        stream = self.stream if self.on else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            # The caching allocator must not give the latents' memory to the next batch before
            # this stream has read them.
            latents.record_stream(stream)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pixels, bad = uint8_on_device(decode(latents))
            if stream is None:
                return InFlight(chunk, batch_id, started, pixels.cpu(), bad.cpu())
            host_pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host_bad = torch.empty(bad.shape, dtype=bad.dtype, pin_memory=True)
            host_pixels.copy_(pixels, non_blocking=True)
            host_bad.copy_(bad, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
            return InFlight(chunk, batch_id, started, host_pixels, host_bad, done)

    def collect(self, inflight: InFlight) -> tuple[np.ndarray, list[float], float]:
        """Wait for a started batch's pixels: [B, H, W, 3] uint8, each image's share of non-finite
        values, and the device seconds per image, the wall time since the batch before it was
        collected (or since it started). A kernel error in the decode is raised here."""
        if inflight.done is not None:
            inflight.done.synchronize()
        now = time.perf_counter()
        per_image = (now - max(inflight.started, self._last_done)) / len(inflight.chunk)
        self._last_done = now
        if inflight.pixels is None or inflight.bad is None:
            raise ValueError(f"batch {inflight.batch_id!r} failed before it started: {inflight.error}")
        pixels = inflight.pixels.numpy()
        if inflight.done is not None:
            pixels = pixels.copy()  # out of the pinned buffer, which goes back to the host allocator
        return pixels, inflight.bad.tolist(), per_image
