"""How a generator cuts requests into pipeline calls, and what it does when one runs out of memory.

- One pipeline call needs one LoRA stack, scheduler, step count, guidance, size and negative-prompt
  mode (`group_key`); a group is cut into batches of at most `BatchSizes.limit` images, ordered by
  image_id so that `regenerate` can rebuild a batch from its members alone. With `batch_invariant`
  (the default) every image is a batch of its own.
- Compiled graphs have fixed batch shapes: a short batch is padded up to `BatchSizes.bucket` (the
  padding's images are dropped) instead of compiling its size (minutes on a GPU).
- Out of memory with a batch alone on the device: the batch size halves for the generator's life
  (a compiled bucket too: one new shape), and the rest is cut again (`BatchSizes.halve`). A single
  image, or a recorded batch that must not be split (`exact`), fails with `out_of_memory_error`.
  Out of memory beside a batch still decoding is the decode overlap's to resolve (see
  app/generator/overlap.py and `Generator._render_chunks`, which runs both policies).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.compute import ComputeSpec
from app.request import RenderRequest


def group_key(r: RenderRequest) -> tuple:
    """Requests with equal keys can share one pipeline call."""
    # One LoRA stack (fused or not), scheduler, step count, guidance and size, and either no
    # negative prompts or all (see Generator._denoise).
    # Image-conditioned requests render one by one (app/generator/conditioned.py): their own group.
    return (r.combination_key, r.scheduler, r.steps, r.guidance, r.width, r.height, not r.negative_prompt, r.mode)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def batch_id(chunk: list[RenderRequest]) -> str:
    """A batch's name in the catalog: its image's id when alone, else a hash of its members' ids."""
    if len(chunk) == 1:
        return chunk[0].image_id
    return hashlib.sha256("".join(r.image_id for r in chunk).encode()).hexdigest()[:32]


def out_of_memory_error(chunk: list[RenderRequest]) -> str:
    """The error of a batch that ran out of memory and cannot be split further."""
    r0 = chunk[0]
    what = "one image" if len(chunk) == 1 else f"a recorded batch of {len(chunk)}"
    return (
        f"generate_error: out of memory at {r0.width}x{r0.height} for {what} "
        f"(compute.vae_tiling_above decodes large images in tiles)"
    )


@dataclass
class BatchSizes:
    """The batch sizes of one generator, lowered for good when a batch runs out of memory."""

    limit: int  # the most images in one pipeline call
    bucket: int  # short batches are padded to this many images (compiled graphs); 0: no padding
    invariant: bool  # every image in a batch of its own

    @classmethod
    def for_compute(cls, compute: ComputeSpec) -> BatchSizes:
        bucket = compute.batch_size if compute.compile and not compute.batch_invariant else 0
        return cls(limit=compute.batch_size, bucket=bucket, invariant=compute.batch_invariant)

    def split(self, group: list[RenderRequest]) -> list[list[RenderRequest]]:
        """One group's pipeline calls."""
        if self.invariant:
            return [[r] for r in group]
        # Batches ordered by image_id, so `regenerate` can rebuild one from its members alone.
        return chunks(sorted(group, key=lambda r: r.image_id), self.limit)

    def pad(self, chunk: list[RenderRequest]) -> list[RenderRequest]:
        """The chunk padded to the bucket with copies of its last request (their images are dropped)."""
        return chunk + [chunk[-1]] * (self.bucket - len(chunk))

    @staticmethod
    def can_split(chunk: list[RenderRequest], exact: bool) -> bool:
        """Whether a chunk that runs out of memory alone can be tried again in smaller batches."""
        return len(chunk) > 1 and not exact

    def halve(self, chunk: list[RenderRequest], queue: list[list[RenderRequest]]) -> list[list[RenderRequest]]:
        """`chunk` ran out of memory alone on the device: halve the batch size for good and cut
        it and the chunks queued after it again."""
        self.limit = max(1, len(chunk) // 2)
        if self.bucket:
            self.bucket = self.limit  # a new compiled shape, once
        return chunks([r for c in [chunk, *queue] for r in c], self.limit)
