"""RemoteGenerator: a remote backend as a Ray Data stage (a CPU actor), with the diffusers
Generator's output columns, so Finish, QC and the catalog are the same code path.

Reads: image_id, status, error, request. Adds: pixels, nonfinite, gpu_seconds, accelerator,
batch_id, batch_size, generator_id, lora_switches, lora_switch_seconds, the `cond_*` measures of
image-conditioned rows (app/backends/conditioned.py), and `backend` (the lineage, one JSON object
per row; empty for rows not rendered here).
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
from PIL import Image

from app.backends import BackendConfig, BackendResult, build_backend
from app.conditioning.measures import MEASURE_COLUMNS, Measures
from app.request import RenderRequest, requests_from_batch


class RemoteGenerator:
    def __init__(self, config: BackendConfig):
        self.config = config
        self.backend = build_backend(config)  # the HTTP client and key are built here, in the actor
        self.generator_id = f"{config.backend}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.accelerator = f"api:{config.backend}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        pending = [i for i in range(n) if batch["status"][i] == "pending"]
        requests = requests_from_batch(batch, pending)
        results = {r.image_id: r for r in self.backend.render(requests)}
        by_id = {r.image_id: r for r in requests}
        status, error = list(batch["status"]), list(batch["error"])
        pixels, wall, lineage = [], [], []
        measures: dict[str, list[float]] = {c: [] for c in MEASURE_COLUMNS}
        for i in range(n):
            r = results.get(batch["image_id"][i])
            if r is not None and r.error is not None:
                status[i], error[i] = "failed", f"{r.lineage.backend} {r.error}"
            image = None if r is None or r.image is None else fit(r, by_id[r.image_id])
            pixels.append(b"" if image is None else image.tobytes())
            wall.append(0.0 if r is None else r.wall_s)
            lineage.append("" if r is None else json.dumps(catalog_backend(r)))
            for column, value in (r.measures if r is not None and r.measures else Measures()).as_columns().items():
                measures[column].append(value)
        return {
            **batch,
            "status": np.array(status, dtype=object),
            "error": np.array(error, dtype=object),
            "pixels": np.array(pixels, dtype=object),
            "nonfinite": np.zeros(n, dtype=np.float64),
            "gpu_seconds": np.zeros(n, dtype=np.float64),  # no device of ours: the API price is the cost
            "accelerator": np.array([self.accelerator] * n, dtype=object),
            "batch_id": np.array(list(batch["image_id"]), dtype=object),
            "batch_size": np.ones(n, dtype=np.int32),
            "generator_id": np.array([self.generator_id] * n, dtype=object),
            "lora_switches": np.zeros(n, dtype=np.int64),
            "lora_switch_seconds": np.zeros(n, dtype=np.float64),
            "backend_wall_seconds": np.array(wall, dtype=np.float64),
            "backend": np.array(lineage, dtype=object),
            **{column: np.array(values, dtype=np.float64) for column, values in measures.items()},
        }


def catalog_backend(result: BackendResult) -> dict:
    """The catalog's `backend` struct (app/catalog/schema.py BACKEND) of one result."""
    lineage = result.lineage.as_dict()
    return {"name": lineage.pop("backend"), **lineage, "api_cost_usd": result.cost_usd}


def fit(result: BackendResult, request: RenderRequest) -> np.ndarray:
    """The provider's image at the requested size (Stability picks its own from an aspect ratio);
    a resize is recorded in the lineage's `unhonoured` as width/height."""
    image = result.image
    if image is None:
        raise ValueError(f"{result.image_id}: a failed result has no image to fit")
    if image.shape[:2] == (request.height, request.width):
        return image
    if "width" not in result.lineage.unhonoured:
        from dataclasses import replace

        result.lineage = replace(result.lineage, unhonoured=(*result.lineage.unhonoured, "width", "height"))
    resized = Image.fromarray(image).resize((request.width, request.height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)  # [H, W, 3]
