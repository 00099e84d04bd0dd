"""The registry's errors. Library (MLflow) errors are turned into these at the boundary.

`UnresolvedReference` is also a `SpecError` and `VersionMismatch` also a `ModelFileError`, so the
job and CLI, which already report those as bad input (exit code 2), report these the same way.
"""

from __future__ import annotations

from app.models.digest import ModelFileError
from app.spec import SpecError


class RegistryError(Exception):
    """A registry operation cannot be done; the message names the model, version or alias."""


class UnresolvedReference(RegistryError, SpecError):
    """A `models:/`, `prompts:/` or `qc:/` reference names no existing version."""


class VersionMismatch(RegistryError, ModelFileError):
    """A registered version's files no longer have the sha256 it was registered with."""
