"""The generator stages as the job hands them to Ray Data: named by import path, imported in the
actor that runs them.

Importing the generator in the driver (torch, diffusers) took seconds of every job's start,
serially, before the first generator actor could start; the driver only wires the stage. Each
class keeps its stage's name, so Ray Data's operator and its actors read `MapBatches(Generator)`
as before."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import numpy as np


class StageByName:
    """`target` ("module:Class") built with the constructor's keyword arguments in the actor,
    then called per batch."""

    target: ClassVar[str]

    def __init__(self, **kwargs: Any):
        module, _, name = self.target.partition(":")
        self.stage = getattr(importlib.import_module(module), name)(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.stage(batch)


class Generator(StageByName):
    """app.generator.Generator."""

    target = "app.generator:Generator"


class GeneratorWithClip(StageByName):
    """app.qc.clip_stage.GeneratorWithClip: CLIP measured on the generator's device."""

    target = "app.qc.clip_stage:GeneratorWithClip"
