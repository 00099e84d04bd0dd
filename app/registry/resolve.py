"""Turning registry references into concrete versions, and a spec into one that names no alias.

`resolve_spec_references(spec, client)` replaces every reference in a spec — `model.base`,
`model.loras[].name`, `combinations.<name>.base` / `.loras[].name`, `input.prompt_template` (or
`input.template_name`), `qc` — by the concrete value (a model name bound to one version, the
template text, the QC settings) and returns what each reference resolved to. The run records that,
so moving an alias later never changes what a finished run says it used.

Models come back as catalog entries (`ModelEntry`, with the registry version and the registered
sha256); `ResolvedVersions.merge_into(catalog)` adds them to a `ModelCatalog` for `resolve_models`.
A model is known in the run by its registered name, or as `<name>-v<version>` when one spec uses
two versions of it (an A/B test of `@production` against `@candidate`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.models.catalog import ModelCatalog, ModelEntry
from app.models.digest import ModelFileError, path_sha256
from app.qc import QcSettings
from app.registry.errors import RegistryError, UnresolvedReference, VersionMismatch
from app.registry.refs import Reference, from_mlflow_template, is_reference, parse_reference
from app.registry.register import DEPRECATED_TAG, QC_FILE, REFERENCE_FILE, content_sha256
from app.registry.store import find_entry
from app.spec import JobSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from app.expand import ResolvedModels


@dataclass(frozen=True)
class ResolvedRef:
    """What one reference resolved to, at the moment of resolving."""

    field: str  # where it was in the spec: model.base, model.loras[0].name, input.prompt_template, qc
    reference: str  # as written: models:/brand-style@production
    kind: str  # model | prompt | qc
    name: str  # registered name: brand-style, ecommerce_studio, qc-default
    version: str
    alias: str | None
    digest: str  # model: files' sha256; prompt: sha256 of the template text; qc: qc_version
    value: str = ""  # what the spec holds now: the model's name in the run (`brand-style`), the
    # template name, or the qc_version
    deprecated: str = ""  # a prompt version marked deprecated in the registry: the reason given

    def describe(self) -> str:
        return f"{self.reference} -> {self.name} version {self.version} ({self.digest[:16]})"

    def warning(self) -> str:
        """A deprecated version's warning ("" when it is not deprecated)."""
        if not self.deprecated:
            return ""
        return f"{self.field}: {self.reference} resolves to {self.name} version {self.version}, which is deprecated ({self.deprecated})"


@dataclass(frozen=True)
class ResolvedVersions:
    refs: tuple[ResolvedRef, ...] = ()
    models: dict[str, ModelEntry] = field(default_factory=dict)  # the model's name in the run -> catalog entry

    def merge_into(self, catalog: ModelCatalog) -> ModelCatalog:
        """`catalog` with the resolved models added (replacing catalog entries of the same name)."""
        if not self.models:
            return catalog
        origin = f"{catalog.origin} + registry ({', '.join(f'{n} v{e.version}' for n, e in self.models.items())})"
        return replace(catalog, entries={**catalog.entries, **self.models}, origin=origin)

    def catalog_overlay(self) -> dict:
        """The resolved models as a user-catalog mapping (YAML-ready: `imagefab regenerate --catalog`)."""
        sections: dict[str, dict] = {"base_models": {}, "loras": {}}
        for name, e in self.models.items():
            body = {k: v for k, v in asdict(e).items() if k not in ("name", "kind") and v not in (None, "")}
            sections["base_models" if e.kind == "base" else "loras"][name] = body
        return sections

    def check_models(self, models: ResolvedModels) -> None:
        """Raise VersionMismatch when a model the job resolved has other bytes than were registered."""
        resolved = {**models.bases, **models.loras}
        for ref in self.refs:
            r = resolved.get(ref.value or ref.name) if ref.kind == "model" else None
            if r is not None and r.sha256 != ref.digest:
                raise VersionMismatch(
                    f"{ref.field}: {ref.reference} is {ref.name} version {ref.version}, registered with sha256 "
                    f"{ref.digest}, but its files at {r.path} have sha256 {r.sha256}"
                )

    def warnings(self) -> list[str]:
        """One line per deprecated version the spec uses."""
        return [r.warning() for r in self.refs if r.deprecated]

    def tags(self) -> dict[str, str]:
        """MLflow run tags: `imagefab.ref.model.loras.0.name` -> 'models:/… -> brand-style version 2 (…)'."""
        return {"imagefab.ref." + re.sub(r"\[(\d+)\]", r".\1", r.field): r.describe() for r in self.refs}

    def to_dict(self) -> dict:
        return {"references": [asdict(r) for r in self.refs], "models": {n: asdict(e) for n, e in self.models.items()}}

    @classmethod
    def from_dict(cls, data: dict | None) -> ResolvedVersions:
        data = data or {}
        return cls(
            refs=tuple(ResolvedRef(**r) for r in data.get("references", [])),
            models={n: ModelEntry(**e) for n, e in data.get("models", {}).items()},
        )


def has_references(spec: JobSpec) -> bool:
    """Whether the spec names anything through the registry (and must be resolved before it runs)."""
    values = [
        spec.model.base,
        *(lo.name for lo in spec.model.loras),
        spec.input.prompt_template,
        spec.input.template_name,
        spec.qc,
    ]
    combos = getattr(spec, "combinations", None) or {}
    return any(is_reference(v) for v in values) or any(_combination_has_reference(c) for c in combos.values())


def _combination_has_reference(combo) -> bool:
    return is_reference(combo.base) or any(is_reference(lo.name) for lo in combo.loras)


# --- one reference -----------------------------------------------------------------------------------


def resolve_model(client: MlflowClient, ref: Reference | str, field_name: str = "") -> tuple[ModelEntry, ResolvedRef]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> a catalog entry bound to that version."""
    ref = _parsed(ref, "models", field_name)
    mv = _model_version(client, ref, field_name)
    reference = _read_json(client, mv, REFERENCE_FILE, ref, field_name)
    if reference.get("sha256") != mv.tags.get("sha256"):
        raise RegistryError(
            f"{_at(field_name)}{ref}: version {mv.version}'s reference.json says sha256 "
            f"{reference.get('sha256')} but its tag says {mv.tags.get('sha256')}"
        )
    try:
        entry = ModelEntry(
            name=ref.registered_name,
            kind=reference["kind"],
            source=reference["source"],
            version=str(mv.version),
            sha256=reference["sha256"],
            base=reference.get("base"),
            config=reference.get("config"),
            arch=reference.get("arch") if reference["kind"] == "base" else None,
            dtype=reference.get("dtype") or "auto",
            seed=int(reference.get("seed") or 0),
            rank=int(reference.get("rank") or 4),
            description=reference.get("description") or "",
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"{_at(field_name)}{ref}: version {mv.version}'s reference.json lacks {e}") from None
    return entry, ResolvedRef(field_name, str(ref), "model", entry.name, entry.version, ref.alias, entry.sha256 or "")


def resolve_prompt(client: MlflowClient, ref: Reference | str, field_name: str = "") -> tuple[str, ResolvedRef]:
    """`prompts:/NAME@ALIAS` or `prompts:/NAME/VERSION` -> the template in imagefab's `{column}` syntax."""
    from mlflow.exceptions import MlflowException

    ref = _parsed(ref, "prompts", field_name)
    entry = find_entry(client, ref.name)
    if entry is None or entry.kind != "prompt":
        raise UnresolvedReference(
            f"{_at(field_name)}{ref}: there is no prompt '{ref.name}'"
            + (" (it is a registered model: use models:/)" if entry else "")
        )
    try:
        if ref.alias:
            pv = client.get_prompt_version_by_alias(ref.name, ref.alias)
        else:
            version = max(entry.versions(), key=int) if ref.version == "latest" else ref.version
            pv = client.get_prompt_version(ref.name, version)
    except MlflowException:
        pv = None
    if pv is None:
        raise UnresolvedReference(_missing(ref, entry, field_name))
    text = from_mlflow_template(pv.template)
    digest = hashlib.sha256(text.encode()).hexdigest()
    deprecated = (getattr(pv, "tags", None) or {}).get(DEPRECATED_TAG, "")
    return text, ResolvedRef(
        field_name, str(ref), "prompt", ref.name, str(pv.version), ref.alias, digest, deprecated=deprecated
    )


def resolve_qc(client: MlflowClient, ref: Reference | str, field_name: str = "qc") -> tuple[QcSettings, ResolvedRef]:
    """`qc:/NAME@ALIAS` or `qc:/NAME/VERSION` (registered model `qc-NAME`) -> QcSettings."""
    ref = _parsed(ref, "qc", field_name)
    mv = _model_version(client, ref, field_name)
    data = _read_json(client, mv, QC_FILE, ref, field_name)
    try:
        settings = QcSettings.model_validate(data)
    except ValueError as e:
        raise RegistryError(f"{_at(field_name)}{ref}: version {mv.version} holds invalid QC settings: {e}") from None
    stored = mv.tags.get("content_sha256")
    if stored is not None and stored != content_sha256(data):
        raise RegistryError(
            f"{_at(field_name)}{ref}: version {mv.version}'s {QC_FILE} does not match its content_sha256 tag: "
            "it was changed after it was registered"
        )
    # The stored settings are what was registered; a qc_version that differs from its tag then
    # only means this imagefab knows more settings (their defaults fill in): not a mismatch.
    if stored is None and mv.tags.get("qc_version") not in (None, settings.qc_version):
        raise RegistryError(
            f"{_at(field_name)}{ref}: version {mv.version} is tagged qc_version "
            f"{mv.tags['qc_version']} but holds settings of {settings.qc_version}"
        )
    return settings, ResolvedRef(
        field_name, str(ref), "qc", ref.registered_name, str(mv.version), ref.alias, settings.qc_version
    )


# --- a whole spec ------------------------------------------------------------------------------------


def resolve_spec_references(
    spec: JobSpec, client: MlflowClient, *, catalog: ModelCatalog | None = None, verify: bool = True
) -> tuple[JobSpec, ResolvedVersions]:
    """The spec with every registry reference replaced by its concrete value, and what each resolved to.

    `verify`: hash each referenced model's files now and raise VersionMismatch naming the
    registered and the actual sha256. A job that resolves models right after can pass False and
    call `ResolvedVersions.check_models(models)` instead, so files are hashed once.
    """
    refs: list[ResolvedRef] = []
    changes: dict[str, Any] = {}

    # 1. models: resolve every reference, then name each concrete version
    found: dict[str, tuple[ModelEntry, ResolvedRef]] = {}  # field -> resolved

    def model(value: str, where: str, kind: str) -> None:
        entry, rec = resolve_model(client, _parse(value, where), where)
        if entry.kind != kind:
            what = {"base": "a base model", "lora": "a LoRA"}
            raise UnresolvedReference(f"{where}: {value} is {what[entry.kind]}, but {where} needs {what[kind]}")
        found[where] = (entry, rec)

    combos = getattr(spec, "combinations", None) or {}
    stacks = {"model": spec.model, **{f"combinations.{n}": c for n, c in combos.items()}}
    for at, combo in stacks.items():
        if is_reference(combo.base):
            model(combo.base, f"{at}.base", "base")
        for i, lo in enumerate(combo.loras):
            if is_reference(lo.name):
                model(lo.name, f"{at}.loras[{i}].name", "lora")
    names = _concrete_names([e for e, _ in found.values()])
    models: dict[str, ModelEntry] = {}
    for entry, rec in found.values():
        concrete = names[(entry.name, entry.version)]
        models[concrete] = replace(entry, name=concrete)
        refs.append(replace(rec, value=concrete))

    def concrete_name(value: str, where: str) -> str:
        if where not in found:
            return value
        entry = found[where][0]
        return names[(entry.name, entry.version)]

    # the spec's stacks with the concrete names

    for at, combo in stacks.items():
        base = concrete_name(combo.base, f"{at}.base")
        loras = [
            {"name": concrete_name(lo.name, f"{at}.loras[{i}].name"), "weight": lo.weight}
            for i, lo in enumerate(combo.loras)
        ]
        if at == "model":
            if base != combo.base:
                changes["model.base"] = base
            if any(lo["name"] != old.name for lo, old in zip(loras, combo.loras)):
                changes["model.loras"] = loras
        elif base != combo.base or any(lo["name"] != old.name for lo, old in zip(loras, combo.loras)):
            changes.setdefault(
                "combinations", {n: c.model_dump(mode="json", exclude_unset=True) for n, c in combos.items()}
            )
            name = at.removeprefix("combinations.")
            changes["combinations"][name].update(base=base, loras=loras)

    # 2. the prompt template
    where, value = _template_reference(spec)
    if value is not None:
        text, rec = resolve_prompt(client, _parse(value, where), where)
        refs.append(replace(rec, value=rec.name))
        changes["input.prompt_template"] = text
        changes["input.template_name"] = rec.name

    # 3. QC settings (`qc: qc:/default@production` once the spec accepts a reference there)
    if isinstance(spec.qc, str) and is_reference(spec.qc):
        settings, rec = resolve_qc(client, _parse(spec.qc, "qc"), "qc")
        refs.append(replace(rec, value=settings.qc_version))
        changes["qc"] = settings.model_dump(mode="json")
    elif isinstance(spec.qc, str):
        raise UnresolvedReference(f"qc: {spec.qc!r} is neither QC settings nor a qc:/NAME@ALIAS reference")

    versions = ResolvedVersions(refs=tuple(refs), models=models)
    if not changes:
        return spec, versions
    resolved_spec = spec.with_overrides(**changes)
    if verify and models:
        verify_models(versions, catalog or ModelCatalog.load(resolved_spec.model.catalog))
    return resolved_spec, versions


def verify_models(versions: ResolvedVersions, catalog: ModelCatalog) -> None:
    """Hash every resolved model's files and compare with the registered sha256."""
    merged = versions.merge_into(catalog)
    for ref in versions.refs:
        if ref.kind != "model":
            continue
        entry = versions.models[ref.value or ref.name]
        where = (
            f"{_at(ref.field)}{ref.reference} is {ref.name} version {ref.version}, registered with sha256 {ref.digest}"
        )
        try:
            if entry.source_kind in ("single_file", "folder"):
                path = Path(entry.source.removeprefix("file:")).expanduser()
                if not path.exists():
                    raise VersionMismatch(f"{where}, but {path} no longer exists")
                actual, at = path_sha256(path), str(path)
            else:  # built-in or hub: let the catalog build or find the files
                r = merged.resolve_base(entry.name) if entry.kind == "base" else merged.resolve_lora(entry.name)
                actual, at = r.sha256, str(r.path)
        except ModelFileError as e:
            if isinstance(e, VersionMismatch):
                raise
            raise VersionMismatch(f"{where}, but its files cannot be checked: {e}") from None
        if actual != ref.digest:
            raise VersionMismatch(f"{where}, but its files at {at} now have sha256 {actual}")


# --- helpers ---------------------------------------------------------------------------------------


def _concrete_names(entries: list[ModelEntry]) -> dict[tuple[str, str], str]:
    """(registered name, version) -> the model's name in the run: the registered name, or
    `<name>-v<version>` when the spec uses several versions of one model (an A/B test of
    `@production` against `@candidate`), since a run knows each model by one name."""
    versions: dict[str, set[str]] = {}
    for e in entries:
        versions.setdefault(e.name, set()).add(e.version)
    return {(e.name, e.version): e.name if len(versions[e.name]) == 1 else f"{e.name}-v{e.version}" for e in entries}


def _template_reference(spec: JobSpec) -> tuple[str, str | None]:
    inp = spec.input
    if is_reference(inp.prompt_template):
        if is_reference(inp.template_name):
            raise UnresolvedReference("input.template_name: give the prompts:/ reference in input.prompt_template only")
        return "input.prompt_template", inp.prompt_template
    if is_reference(inp.template_name):
        if inp.prompt_template is not None:
            raise UnresolvedReference(
                f"input.template_name: {inp.template_name} fetches a template, but input.prompt_template is "
                f"given too; remove one of them"
            )
        return "input.template_name", inp.template_name
    return "", None


def _parse(value: str, where: str) -> Reference:
    try:
        return parse_reference(value)
    except ValueError as e:
        raise UnresolvedReference(f"{where}: {e}") from None


def _parsed(ref: Reference | str, scheme: str, where: str) -> Reference:
    ref = _parse(ref, where) if isinstance(ref, str) else ref
    if ref.scheme != scheme:
        raise UnresolvedReference(f"{_at(where)}{ref} is not a {scheme}:/ reference")
    return ref


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _model_version(client: MlflowClient, ref: Reference, where: str):
    from mlflow.exceptions import MlflowException

    name = ref.registered_name
    entry = find_entry(client, name)
    if entry is None or entry.kind != "model":
        hint = " (it is a prompt: use prompts:/)" if entry else ""
        raise UnresolvedReference(f"{_at(where)}{ref}: there is no registered model '{name}'{hint}")
    try:
        if ref.alias:
            return client.get_model_version_by_alias(name, ref.alias)
        version = max(entry.versions(), key=int) if ref.version == "latest" else ref.version
        if version is None:
            raise UnresolvedReference(f"{_at(where)}{ref}: names neither an alias nor a version")
        return client.get_model_version(name, version)
    except (MlflowException, ValueError):  # ValueError: max() of no versions
        raise UnresolvedReference(_missing(ref, entry, where)) from None


def _missing(ref: Reference, entry, where: str) -> str:
    versions = entry.versions()
    if ref.alias:
        aliases = entry.aliases()
        shown = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
        return f"{_at(where)}{ref}: '{entry.name}' has no alias '{ref.alias}'; its aliases: {shown}"
    shown = ", ".join(versions) or "none"
    return f"{_at(where)}{ref}: '{entry.name}' has no version {ref.version}; its versions: {shown}"


def _read_json(client: MlflowClient, mv, filename: str, ref: Reference, where: str) -> dict:
    from mlflow.exceptions import MlflowException

    folder = filename.rsplit(".", 1)[0]
    if not mv.run_id:
        raise RegistryError(f"{_at(where)}{ref}: version {mv.version} was not registered by imagefab (no {filename})")
    with tempfile.TemporaryDirectory(prefix="imagefab-registry-") as tmp:
        try:
            local = client.download_artifacts(mv.run_id, f"{folder}/{filename}", tmp)
            return json.loads(Path(local).read_text())
        except (MlflowException, OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"{_at(where)}{ref}: cannot read {filename} of version {mv.version}: {e}") from e
