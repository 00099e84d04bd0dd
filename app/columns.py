"""Columns of Ray Data's numpy batches (`batch_format="numpy"`), shared by every stage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def object_column(values: Sequence) -> np.ndarray:
    """A 1-D object array of `values` as they are: `np.asarray` would turn a list of equal-length
    lists or bytes into a 2-D array or a fixed-width dtype."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column
