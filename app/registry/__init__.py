"""Versions and rollback in MLflow: models, LoRAs, prompt templates and QC settings.

  refs.py      reference syntax (models:/…, prompts:/…, qc:/…) and template conversion
  store.py     the MLflow store, registry entries, aliases with history (promote, rollback)
  register.py  registering models, templates, QC settings (idempotent by content sha256)
  resolve.py   references -> concrete versions; a spec -> a spec without references
  tracking.py  a bulk run as an MLflow run (params, dataset, metrics, contact sheet); serving
  server.py    `imagefab mlflow`: the local tracking server
  cli.py       `imagefab registry …` (add_registry_cli)

Importing this package imports no MLflow (5 s): names load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RegistryError": "errors",
    "UnresolvedReference": "errors",
    "VersionMismatch": "errors",
    "Reference": "refs",
    "parse_reference": "refs",
    "is_reference": "refs",
    "to_mlflow_template": "refs",
    "from_mlflow_template": "refs",
    "tracking_uri": "store",
    "make_client": "store",
    "promote": "store",
    "rollback": "store",
    "alias_log": "store",
    "AliasMove": "store",
    "RegisteredVersion": "register",
    "register_model": "register",
    "register_prompt": "register",
    "register_qc": "register",
    "register_catalog": "register",
    "register_builtins": "register",
    "deprecate_prompt": "register",
    "ResolvedRef": "resolve",
    "ResolvedVersions": "resolve",
    "resolve_model": "resolve",
    "resolve_prompt": "resolve",
    "resolve_qc": "resolve",
    "resolve_spec_references": "resolve",
    "has_references": "resolve",
    "verify_models": "resolve",
    "track_run": "tracking",
    "track_job_output": "tracking",
    "track_job_output_or_warn": "tracking",
    "record_serving": "tracking",
    "add_registry_cli": "cli",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (built from the lazy-export table)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app.registry' has no attribute '{name}'")
    return getattr(importlib.import_module(f"app.registry.{module}"), name)
