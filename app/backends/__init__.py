"""Generator backends: where the pixels come from (the diffusers generator, or a remote API).

`build_backend` is the one place a concrete remote backend is chosen.
"""

from __future__ import annotations

from app.backends.base import (
    BACKENDS,
    REMOTE_BACKENDS,
    Backend,
    BackendConfig,
    BackendError,
    BackendResult,
    Lineage,
)


def build_backend(config: BackendConfig) -> Backend:
    if config.backend == "a1111":
        from app.backends.a1111 import A1111Backend

        return A1111Backend(config)
    if config.backend == "stability":
        from app.backends.stability import StabilityBackend

        return StabilityBackend(config)
    if config.backend == "openai":
        from app.backends.openai_images import OpenAIImagesBackend

        return OpenAIImagesBackend(config)
    raise ValueError(f"{config.backend!r} is not a remote backend (remote: {list(REMOTE_BACKENDS)})")


__all__ = [
    "BACKENDS",
    "REMOTE_BACKENDS",
    "Backend",
    "BackendConfig",
    "BackendError",
    "BackendResult",
    "Lineage",
    "build_backend",
]
