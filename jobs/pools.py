"""Sizing the bulk job's generators: actors per base model, rows per generator call, and the
sizes a compiled generator warms up for (no Ray here: the job passes in what the cluster has)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from app.compute import ComputeSpec


def base_of(combination_key: str) -> str:
    return combination_key.split("|", 1)[0]


def with_warmup_sizes(compute: ComputeSpec, requests: pa.ChunkedArray | pa.StructArray) -> ComputeSpec:
    """Compiled generators warm up (compile) at actor start for every size their rows use, unless
    the spec lists sizes itself: the first real batch of each size would otherwise wait minutes.
    `requests`: a `request` column (app.request.REQUEST_TYPE)."""
    if not compute.compile or compute.warmup_sizes:
        return compute
    widths, heights = pc.struct_field(requests, "width"), pc.struct_field(requests, "height")
    sizes = sorted(set(zip(widths.to_pylist(), heights.to_pylist())))
    return compute.model_copy(update={"warmup_sizes": tuple(f"{w}x{h}" for w, h in sizes)})


def generator_call_rows(compute: ComputeSpec, use_gpu: bool) -> int:
    """Rows per generator call. A generator overlaps one batch's decode with the next batch's
    denoising only within a call, so whole batches (not batch-invariant) come two to a call on
    GPUs; a batch-invariant call of `batch_size` rows is already that many one-image batches."""
    two = use_gpu and not compute.batch_invariant and compute.overlaps_decode(on_cuda=True)
    return compute.batch_size * (2 if two else 1)


def pool_sizes(bases: list[str], pending: pa.Table, requested: int | None, gpus: int) -> dict[str, int]:
    """Generators per base model: as asked, else GPUs shared by the work each base has (>= 1)."""
    if requested:
        return {b: requested for b in bases}
    if gpus <= len(bases):
        return {b: 1 for b in bases}
    keys = pending.column("combination").to_pylist()
    work = {b: sum(1 for k in keys if base_of(k) == b) for b in bases}
    total = sum(work.values())
    sizes = {b: max(1, int(gpus * work[b] / total)) for b in bases}
    while sum(sizes.values()) > gpus:
        biggest = max(sizes, key=lambda b: sizes[b])
        sizes[biggest] -= 1
    return sizes
