"""Registering base models, LoRAs, prompt templates and QC settings as versions in MLflow.

Every registration is idempotent: the content's sha256 (`content_sha256`) is compared with the
existing versions, and the same content returns the version that already holds it.

- Models: a registered model per catalog name; each version's artifact is `reference.json`, a small
  reference to the files (source, resolved path, sha256, architecture, kind, base…), never the
  weights. Version tags: `sha256`, `arch`, `kind`, `catalog_version`, `content_sha256`.
- Templates: MLflow's prompt registry, in its `{{variable}}` syntax (see refs.py).
- QC settings: a registered model `qc-<name>` whose version artifact is `qc.json`, tagged with the
  settings' `qc_version`. Not the prompt registry: QC settings are configuration read by code, not
  text; as registered models they get the same versions, aliases, rollback and tag search as the
  LoRAs they are judged with, and MLflow's UI lists them beside the models instead of treating a
  JSON document as a prompt with `{{variables}}`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from app.models.catalog import ModelCatalog, ModelEntry, ResolvedModel, UnknownModelError
from app.models.digest import ModelFileError
from app.qc import QcSettings
from app.registry.errors import RegistryError
from app.registry.refs import QC_PREFIX, from_mlflow_template, to_mlflow_template
from app.registry.store import (
    DEFAULT_ALIAS,
    KIND_TAG,
    check_name,
    experiment_id,
    find_entry,
    promote,
)
from app.spec import template_fields

if TYPE_CHECKING:
    from mlflow import MlflowClient

REGISTRY_EXPERIMENT = "imagefab-registry"  # holds one run per new version: its artifact, who, when
REFERENCE_FILE = "reference.json"
QC_FILE = "qc.json"
REFERENCE_FORMAT = "imagefab-model-reference/1"
# The fields that make two registrations "the same model": not the resolved path (built-in models
# live in each machine's model home) nor the description.
_IDENTITY = ("kind", "source", "sha256", "base", "config", "dtype", "arch", "seed", "rank")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    created: bool  # False: this content was already registered, as `version`
    content_sha256: str
    kind: str  # base | lora | qc | template

    def __str__(self) -> str:
        state = "registered" if self.created else "unchanged "
        return f"{state} {self.kind:8s} {self.name} version {self.version}"


def content_sha256(payload: dict) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- models -----------------------------------------------------------------------------------------


def model_reference(entry: ModelEntry, resolved: ResolvedModel) -> dict:
    """The JSON a model version holds: where the files are and what they must hash to."""
    return {
        "format": REFERENCE_FORMAT,
        "name": entry.name,
        "kind": entry.kind,
        "source": entry.source,
        "path": resolved.path,
        "sha256": resolved.sha256,
        "arch": resolved.arch,
        "base": entry.base,
        "config": entry.config,
        "dtype": entry.dtype,
        "weight_name": resolved.weight_name,
        "seed": entry.seed,
        "rank": entry.rank,
        "catalog_version": entry.version,
        "description": entry.description,
    }


def register_model(
    client: MlflowClient, entry: ModelEntry, *, catalog: ModelCatalog | None = None, aliases: Iterable[str] = ()
) -> RegisteredVersion:
    """Register `entry`'s files as a version of the registered model `entry.name`.

    The entry is resolved through `catalog` (the built-in one by default) with `entry` merged in:
    files are checked (safetensors only), hashed, and a LoRA's architecture is taken from its base.
    To register other files under a name, pass e.g. `ModelEntry(name="brand-style", kind="lora",
    source="/models/brand-style-v7", base="tiny-sdxl")`.
    """
    check_name(entry.name, "model")
    catalog = catalog or ModelCatalog.load()
    merged = replace(catalog, entries={**catalog.entries, entry.name: entry})
    resolved = merged.resolve_base(entry.name) if entry.kind == "base" else merged.resolve_lora(entry.name)
    reference = model_reference(entry, resolved)
    digest = content_sha256({k: reference[k] for k in _IDENTITY})
    tags = {
        "sha256": resolved.sha256,
        "arch": resolved.arch,
        "kind": entry.kind,
        "catalog_version": entry.version,
        "content_sha256": digest,
    }
    return _register_artifact(
        client, entry.name, entry.kind, reference, REFERENCE_FILE, tags, description=entry.description, aliases=aliases
    )


def register_catalog(
    client: MlflowClient,
    catalog: ModelCatalog | None = None,
    *,
    alias: str | None = DEFAULT_ALIAS,
    report: Callable[[str], None] = lambda _: None,
) -> list[RegisteredVersion]:
    """Every model in the catalog that can be resolved here; `alias` set where it is not set yet.

    Models that cannot be resolved on this machine (a hub model not in the local cache) are
    reported and skipped.
    """
    catalog = catalog or ModelCatalog.load()
    done = []
    for kind in ("base", "lora"):
        for name in catalog.names(kind):
            try:
                reg = register_model(client, catalog.entries[name], catalog=catalog)
            except (ModelFileError, UnknownModelError) as e:
                report(f"skipped  {kind:8s} {name}: {e}")
                continue
            done.append(reg)
            report(str(reg) + _initial_alias(client, reg, alias))
    return done


# --- QC settings ------------------------------------------------------------------------------------


def register_qc(
    client: MlflowClient, name: str, settings: QcSettings, *, aliases: Iterable[str] = ()
) -> RegisteredVersion:
    """Register QC settings as a version of the registered model `qc-<name>`."""
    check_name(name, "QC settings")
    payload = settings.model_dump(mode="json")
    digest = content_sha256(payload)
    tags = {"kind": "qc", "qc_version": settings.qc_version, "content_sha256": digest}
    return _register_artifact(
        client,
        QC_PREFIX + name,
        "qc",
        payload,
        QC_FILE,
        tags,
        description=f"QC settings '{name}' ({settings.qc_version})",
        aliases=aliases,
    )


# --- prompt templates --------------------------------------------------------------------------------


def register_prompt(
    client: MlflowClient, name: str, template: str, *, commit_message: str | None = None, aliases: Iterable[str] = ()
) -> RegisteredVersion:
    """Register an imagefab `{column}` template as a version of prompt `name` (stored as `{{column}}`)."""
    from mlflow.exceptions import MlflowException

    check_name(name, "prompt")
    try:
        template_fields(template)
        stored = to_mlflow_template(template)
    except ValueError as e:
        raise RegistryError(f"prompt '{name}': {e}") from None
    digest = hashlib.sha256(template.encode()).hexdigest()
    entry = find_entry(client, name)
    if entry is not None and entry.kind != "prompt":
        raise RegistryError(f"'{name}' is a registered model; a prompt cannot have the same name in MLflow")
    version, created = None, False
    try:
        if entry is None:
            client.create_prompt(name, description=f"imagefab prompt template '{name}'", tags={KIND_TAG: "template"})
        else:
            for v in client.search_prompt_versions(name):  # templates are few; no paging needed
                if from_mlflow_template(v.template) == template:
                    version = str(v.version)
                    break
        if version is None:
            pv = client.create_prompt_version(
                name,
                stored,
                description=commit_message or "registered by imagefab",
                tags={"content_sha256": digest, KIND_TAG: "template"},
            )
            version, created = str(pv.version), True
    except MlflowException as e:
        raise RegistryError(f"cannot register prompt '{name}': {e.message}") from e
    for alias in aliases:
        promote(client, name, version, alias)
    return RegisteredVersion(name, version, created, digest, "template")


DEPRECATED_TAG = "imagefab.deprecated"  # a prompt version's tag: why it should no longer be used


def deprecate_prompt(client: MlflowClient, name: str, version: str, reason: str = "", undo: bool = False) -> None:
    """Mark a template version deprecated (or no longer): a spec that resolves to it warns
    (`app/registry/resolve.py`), and the reason says what to use instead."""
    from mlflow.exceptions import MlflowException

    entry = find_entry(client, name)
    if entry is None or entry.kind != "prompt":
        raise RegistryError(f"there is no prompt '{name}'" + (" (it is a registered model)" if entry else ""))
    if str(version) not in entry.versions():
        raise RegistryError(f"prompt '{name}' has no version {version} (versions: {', '.join(entry.versions())})")
    try:
        if undo:
            client.delete_prompt_version_tag(name, str(version), DEPRECATED_TAG)
        else:
            client.set_prompt_version_tag(name, str(version), DEPRECATED_TAG, reason.strip() or "deprecated")
    except MlflowException as e:
        raise RegistryError(f"cannot mark prompt '{name}' version {version}: {e.message}") from e


def spec_templates(specs_dir: str | Path) -> dict[str, str]:
    """`template_name -> prompt_template` of the spec files in a folder (their `input` section)."""
    found: dict[str, str] = {}
    for path in sorted(Path(specs_dir).glob("*.y*ml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RegistryError(f"{path}: cannot read spec ({e})") from None
        inp = data.get("input") if isinstance(data, dict) else None
        if isinstance(inp, dict) and isinstance(inp.get("prompt_template"), str):
            name = inp.get("template_name") or path.stem.replace(" ", "_")
            if name in found and found[name] != inp["prompt_template"]:
                raise RegistryError(f"{path}: template '{name}' differs from another spec's template of that name")
            found[name] = inp["prompt_template"]
    return found


# --- everything at once ------------------------------------------------------------------------------


def register_builtins(
    client: MlflowClient,
    *,
    catalog: ModelCatalog | None = None,
    specs_dir: str | Path | None = "specs",
    alias: str | None = DEFAULT_ALIAS,
    report: Callable[[str], None] = lambda _: None,
) -> list[RegisteredVersion]:
    """The catalog's models, the example specs' templates and the default QC settings.

    Idempotent: a second call registers nothing new. `alias` (production) is set on the first
    version of each entry only, never moved.
    """
    done = register_catalog(client, catalog, alias=alias, report=report)
    if specs_dir is not None and Path(specs_dir).is_dir():
        for name, text in spec_templates(specs_dir).items():
            reg = register_prompt(client, name, text, commit_message=f"from {specs_dir}")
            done.append(reg)
            report(str(reg) + _initial_alias(client, reg, alias))
    reg = register_qc(client, "default", QcSettings())
    done.append(reg)
    report(str(reg) + _initial_alias(client, reg, alias))
    return done


# --- shared -----------------------------------------------------------------------------------------


def _initial_alias(client: MlflowClient, reg: RegisteredVersion, alias: str | None) -> str:
    if not alias:
        return ""
    entry = find_entry(client, reg.name)
    if entry is None or alias in entry.aliases():
        return ""
    promote(client, reg.name, reg.version, alias)
    return f" (@{alias})"


def _register_artifact(
    client: MlflowClient,
    name: str,
    kind: str,
    payload: dict,
    artifact_file: str,
    tags: dict[str, str],
    *,
    description: str,
    aliases: Iterable[str],
) -> RegisteredVersion:
    """A new version of registered model `name` holding `payload` as `artifact_file`, unless a
    version with the same `content_sha256` tag exists already."""
    from mlflow.exceptions import MlflowException

    digest = tags["content_sha256"]
    try:
        entry = find_entry(client, name)
        if entry is None:
            client.create_registered_model(name, tags={KIND_TAG: kind}, description=description)
        elif entry.kind != "model":
            raise RegistryError(f"'{name}' is a prompt; a registered model cannot have the same name in MLflow")
        elif entry.imagefab_kind not in ("", kind):
            raise RegistryError(f"'{name}' is registered as {entry.imagefab_kind}, not {kind}; use another name")
        existing = _version_with_content(client, name, digest)
        if existing is not None:
            version, created = existing, False
        else:
            exp = experiment_id(client, REGISTRY_EXPERIMENT)
            run = client.create_run(exp, run_name=f"register {name}", tags={KIND_TAG: kind, "imagefab.name": name})
            run_id = run.info.run_id
            folder = artifact_file.rsplit(".", 1)[0]
            client.log_dict(run_id, payload, f"{folder}/{artifact_file}")
            client.set_terminated(run_id)
            mv = client.create_model_version(
                name, source=f"{run.info.artifact_uri}/{folder}", run_id=run_id, tags=tags, description=description
            )
            version, created = str(mv.version), True
    except MlflowException as e:
        raise RegistryError(f"cannot register '{name}' in {client.tracking_uri}: {e.message}") from e
    for alias in aliases:
        promote(client, name, version, alias)
    return RegisteredVersion(name, version, created, digest, kind)


def _version_with_content(client: MlflowClient, name: str, digest: str) -> str | None:
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        for mv in page:
            if mv.tags.get("content_sha256") == digest:
                return str(mv.version)
        token = page.token
        if not token:
            return None
