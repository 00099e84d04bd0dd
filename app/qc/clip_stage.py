"""CLIP on the generator: rendered images are embedded on the generator's device right away.

A CPU QC worker spends 0.07 s per image in CLIP's image encoder alone (ViT-B-32, batches of 8,
two cores); the GPU that has just spent seconds denoising the image adds little for it. So when
`QcSettings.clip_runs_on_generator` says so, the generator measures (`clip_measures.measure_clip`:
the image embedding, its cosine to the prompt and to each negative concept) and hands the numbers
to QC in `CLIP_COLUMNS`; QC grades them without loading CLIP (`QualityControl(...,
clip_on_generator=True)`).

  GeneratorWithClip   the bulk job's generator stage: `Generator.__call__`, then `ClipMeasurer`
  ClipMeasurer        a `ClipScorer` on the generator's device; also used by the Serve replicas

The time CLIP takes is device time: each measured image's share is added to its `gpu_seconds`.
A CLIP failure (out of memory, …) fails the rows it was measuring (`clip_error: …`); the actor
lives on. Imports torch (through `clip.py`): only generator processes import this module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from app.columns import object_column
from app.qc.clip import ClipScorer
from app.qc.clip_measures import CLIP_COLUMNS, measure_clip, measure_columns
from app.qc.decision import QcSettings
from app.request import requests_from_batch
from app.stages import image_from_row


class ClipMeasurer:
    """The CLIP model the QC settings name, on the generator's device (`device`: "cuda" or "cpu")."""

    def __init__(self, settings: QcSettings, device: str):
        if settings.clip_model is None:
            raise ValueError("`qc.clip_model` is not set, so there is no CLIP to run on the generator")
        # threads=None: the generator has fixed this process's torch threads (its pixels depend on them).
        self.scorer = ClipScorer(
            settings.clip_model,
            settings.clip_pretrained,
            device=device,
            threads=None,
            seed=settings.clip_seed,
            batch_size=settings.clip_batch_size,
        )
        self.concepts = settings.negative_concepts

    def columns(self, images: Sequence[np.ndarray], prompts: Sequence[str | None]) -> tuple[list[dict], float]:
        """The `CLIP_COLUMNS` values of each image, and the seconds measuring them took."""
        t0 = time.perf_counter()
        measures = measure_clip(self.scorer, images, prompts, self.concepts)
        # The embeddings are in host memory by now, so the device has finished: the time is whole.
        return [measure_columns(m) for m in measures], time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A rendered Ray Data batch with `CLIP_COLUMNS` added for the rows that have pixels."""
        n = len(batch["image_id"])
        rows = [i for i in range(n) if batch["status"][i] == "pending" and len(batch["pixels"][i])]
        status, error = list(batch["status"]), list(batch["error"])
        gpu_seconds = np.array(batch["gpu_seconds"], dtype=np.float64)
        out = [measure_columns(None)] * n
        if rows:
            images = [image_from_row(batch, i) for i in rows]
            prompts = [r.prompt for r in requests_from_batch(batch, rows)]
            try:
                measured, seconds = self.columns(images, prompts)
            except Exception as e:  # OOM, a kernel error: these rows fail, the actor lives on
                for i in rows:
                    status[i], error[i] = "failed", f"clip_error: {type(e).__name__}: {e}"
            else:
                for i, columns in zip(rows, measured):
                    out[i] = columns
                    gpu_seconds[i] += seconds / len(rows)
        return {
            **batch,
            "status": object_column(status),
            "error": object_column(error),
            "gpu_seconds": gpu_seconds,
            **{name: object_column([row[name] for row in out]) for name in CLIP_COLUMNS},
        }

    def add_to_results(self, results: list[dict], images: Sequence[np.ndarray | None], prompts: Sequence[str]) -> None:
        """Serve: add `CLIP_COLUMNS` in place to a replica's result dicts (`app/serve/core.py`
        `rendered_rows`), for those with pixels and no error."""
        for result in results:
            result.update(measure_columns(None))
        kept = {k: image for k, image in enumerate(images) if image is not None and not results[k]["error"]}
        rows = list(kept)
        if not rows:
            return
        try:
            measured, seconds = self.columns(list(kept.values()), [prompts[k] for k in rows])
        except Exception as e:  # as in __call__: these images fail, the replica lives on
            for k in rows:
                results[k]["error"] = f"clip_error: {type(e).__name__}: {e}"
            return
        for k, columns in zip(rows, measured):
            results[k].update(columns)
            results[k]["gpu_seconds"] += seconds / len(rows)


class GeneratorWithClip:
    """The bulk job's generator stage when CLIP runs on the generator: renders, then measures.

    Composes the generator rather than extending it, so any class with the Generator's
    constructor and batch interface can be measured behind (`generator_cls`, e.g. the capacity
    benchmarks' stand-in); CLIP runs on that generator's `device` (CPU when it has none).
    """

    def __init__(self, base, loras, compute, qc: QcSettings, generator_cls=None):
        from app.generator import Generator

        self.generator = (generator_cls or Generator)(base=base, loras=loras, compute=compute)
        device = getattr(self.generator, "device", None)
        self.clip = ClipMeasurer(qc, device.type if device is not None else "cpu")
        self.reads = self.generator.reads
        self.adds = self.generator.adds + CLIP_COLUMNS

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.clip(self.generator(batch))
