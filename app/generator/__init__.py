"""The GPU stage, one concept per module:

- `generator.py`: `Generator`, the Ray Data callable (loads once in `__init__`, `__call__(batch) ->
  batch`), with `render`, `render_batches` and `stats`, and `RenderResult`;
- `pipeline.py`: the pipeline's set-up and speed settings (fused QKV, channels_last, FP8 and its
  error probe, compilation and its shared cache, the attention kernel, warm-up);
- `batching.py`: cutting requests into pipeline calls, padding to a compiled batch bucket, and
  halving the batch for good when one runs out of memory;
- `overlap.py`: decoding one batch on a second CUDA stream while the next denoises, and collecting it;
- `vae_decode.py`: latents to images, diffusers' own steps (copied, marked as such).

Imports no Ray, MLflow or DuckDB, so it also runs alone on a GPU machine for benchmarks.
"""

from app.generator.generator import Generator, RenderResult

__all__ = ["Generator", "RenderResult"]
