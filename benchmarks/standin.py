"""A generator that renders nothing, at a fixed rate: for measuring everything around the GPU.

`StandInGenerator.at_rate(4.0)` is a class with the Generator's constructor `(base, loras,
compute)` and batch interface (`app/generator/generator.py::Generator.__call__`): it reads the
same columns, adds the same ones (`pixels` as raw RGB bytes of the request's size,
`gpu_seconds`, …), and takes `len(pending) / rate` seconds per batch, sleeping off whatever
preparing the batch did not use.
The pixels are a few precomputed noise images per size (noise passes the basic QC checks), so a
run through `jobs.generate.run(spec, generator_cls=...)` exercises Ray Data, the CPU stage and the
catalog exactly as a real run does. Imports no torch: an actor starts in well under a second.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import numpy as np

from app.conditioning.measures import MEASURE_COLUMNS
from app.request import request_at

VARIANTS = 8  # distinct images per size; a request gets one by its seed


class StandInGenerator:
    """Emulates one generator actor rendering `images_per_second` images a second."""

    images_per_second: float = 4.0
    reads = ("image_id", "status", "request")
    adds = (
        "pixels",
        "nonfinite",
        "gpu_seconds",
        "accelerator",
        "accelerator_settings",
        "batch_id",
        "batch_size",
        "generator_id",
        "lora_switches",
        "lora_switch_seconds",
        *MEASURE_COLUMNS,
    )

    @classmethod
    def at_rate(cls, images_per_second: float) -> type[StandInGenerator]:
        """The class to hand to `run(..., generator_cls=)`: Ray builds actors from a class, and the
        constructor is fixed by the Generator's, so the rate travels as a class attribute."""
        if images_per_second <= 0:
            raise ValueError(f"images_per_second must be above 0, not {images_per_second!r}")
        return type(
            f"StandInGenerator_{images_per_second:g}".replace(".", "_"),
            (cls,),
            {"images_per_second": float(images_per_second)},
        )

    def __init__(self, base, loras, compute):
        self.base = base
        self.compute = compute
        self.generator_id = uuid.uuid4().hex[:12]
        self.accelerator = f"standin:{self.images_per_second:g}/s"
        self._images: dict[tuple[int, int], np.ndarray] = {}  # (w, h) -> [VARIANTS, H, W, 3] uint8

    def _image(self, width: int, height: int, seed: int) -> np.ndarray:
        if (width, height) not in self._images:
            rng = np.random.default_rng(width * 100_003 + height)
            self._images[(width, height)] = rng.integers(0, 256, (VARIANTS, height, width, 3), dtype=np.uint8)
        return self._images[(width, height)][seed % VARIANTS]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        n = len(batch["image_id"])
        pending = [i for i in range(n) if batch["status"][i] == "pending"]
        per_image = 1.0 / self.images_per_second
        pixels, gpu_s = [b""] * n, [0.0] * n
        for i in pending:
            req = request_at(batch, i)
            pixels[i] = self._image(req.width, req.height, req.seed).tobytes()
            gpu_s[i] = per_image
        batch_id = hashlib.sha256("".join(str(batch["image_id"][i]) for i in pending).encode()).hexdigest()[:32]
        # The batch takes as long as the emulated device would, whatever the preparing cost.
        time.sleep(max(0.0, t0 + len(pending) * per_image - time.perf_counter()))
        out_pixels = np.empty(n, dtype=object)
        out_pixels[:] = pixels
        return {
            **batch,
            "pixels": out_pixels,
            "nonfinite": np.zeros(n, dtype=np.float64),
            "gpu_seconds": np.asarray(gpu_s, dtype=np.float64),
            "accelerator": np.array([self.accelerator] * n, dtype=object),
            "accelerator_settings": np.full(n, None, dtype=object),  # a stand-in has no device settings
            # One emulated pipeline call per batch, named as the Generator names a batch.
            "batch_id": np.array([batch_id if gpu_s[i] else "" for i in range(n)], dtype=object),
            "batch_size": np.full(n, len(pending), dtype=np.int32),
            "generator_id": np.array([self.generator_id] * n, dtype=object),
            "lora_switches": np.zeros(n, dtype=np.int64),
            "lora_switch_seconds": np.zeros(n, dtype=np.float64),
            # txt2img only: nothing measured against an input image
            **{column: np.full(n, np.nan) for column in MEASURE_COLUMNS},
        }
