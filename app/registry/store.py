"""Where the registry lives, and the alias history that makes rollback possible.

The store is MLflow: `MLFLOW_TRACKING_URI` when set, else `IMAGEFAB_MLFLOW_URI`, else
`sqlite:///mlflow.db` in the working directory (the same file `imagefab mlflow` serves).

Two kinds of registry entries carry aliases: registered models (base models, LoRAs, QC settings)
and prompts. `open_entry` gives either behind one small interface, so promote / rollback / history
work the same for both.

Alias history. MLflow keeps only where an alias points now. Each promotion is pushed on a
per-alias stack kept as a tag on the entry (`imagefab.alias_stack.<alias>`, a JSON list of
versions), and every move is appended to `imagefab.alias_log`. Rollback pops the stack, so it goes
to the version the alias pointed at before, whatever its number; an alias moved outside imagefab
(the MLflow UI) is pushed first, so rolling back from it returns to the last imagefab target. The
read-modify-write of these tags is not atomic: two people promoting the same alias at the same
instant can lose one stack entry (the alias itself is always right).
"""

from __future__ import annotations

import getpass
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from app.registry.errors import RegistryError
from app.registry.refs import NAME

if TYPE_CHECKING:
    from mlflow import MlflowClient

ENV_URI = "IMAGEFAB_MLFLOW_URI"
KIND_TAG = "imagefab.kind"  # base | lora | qc | template
STACK_TAG = "imagefab.alias_stack."
LOG_TAG = "imagefab.alias_log"
LOG_KEEP = 200  # alias moves kept in the log (the stacks are kept whole, up to STACK_KEEP)
STACK_KEEP = 100
DEFAULT_ALIAS = "production"
_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def tracking_uri() -> str:
    """The MLflow store jobs and commands use when none is given."""
    return os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get(ENV_URI) or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def make_client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient whose tracking and registry stores are `uri` (default: `tracking_uri()`)."""
    from mlflow import MlflowClient

    if uri:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created (or restored) if needed.

    With a sqlite store, artifacts go to `mlartifacts/<name>` beside the database file, the folder
    `imagefab mlflow` serves, rather than to MLflow's default `./mlruns` in whatever the working
    directory happens to be.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        location = str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        exp = client.get_experiment_by_name(name)  # created meanwhile by another process
        if exp is None:
            raise RegistryError(f"cannot create MLflow experiment '{name}' in {uri}: {e.message}") from e
        return exp.experiment_id


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# --- registry entries: registered models and prompts behind one interface ------------------------


class RegistryEntry:
    """One registered model or prompt: its versions, aliases and tags."""

    kind: str  # "model" | "prompt"

    def __init__(self, client: MlflowClient, name: str):
        self.client = client
        self.name = name

    def versions(self) -> list[str]:
        raise NotImplementedError

    def aliases(self) -> dict[str, str]:
        raise NotImplementedError

    def tags(self) -> dict[str, str]:
        raise NotImplementedError

    def set_tag(self, key: str, value: str) -> None:
        raise NotImplementedError

    def set_alias(self, alias: str, version: str) -> None:
        raise NotImplementedError

    @property
    def imagefab_kind(self) -> str:
        return self.tags().get(KIND_TAG, "")


class ModelRegistryEntry(RegistryEntry):
    kind = "model"

    def versions(self) -> list[str]:
        found, token = [], None
        while True:
            page = self.client.search_model_versions(f"name='{self.name}'", page_token=token)
            found += [str(v.version) for v in page]
            token = page.token
            if not token:
                return sorted(found, key=int)

    def aliases(self) -> dict[str, str]:
        return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_registered_model(self.name).tags)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_registered_model_tag(self.name, key, value)

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)


class PromptRegistryEntry(RegistryEntry):
    kind = "prompt"

    def versions(self) -> list[str]:
        found, token = [], None
        while True:
            page = self.client.search_prompt_versions(self.name, page_token=token)
            found += [str(v.version) for v in page]
            token = page.token
            if not token:
                return sorted(found, key=int)

    def aliases(self) -> dict[str, str]:
        # Search results carry no aliases; single-version reads do.
        out = {}
        for v in self.versions():
            for alias in self.client.get_prompt_version(self.name, v).aliases:
                out[alias] = v
        return out

    def tags(self) -> dict[str, str]:
        prompt = self.client.get_prompt(self.name)
        return dict(prompt.tags) if prompt else {}

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_prompt_tag(self.name, key, value)

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_prompt_alias(self.name, alias, int(version))


def find_entry(client: MlflowClient, name: str) -> RegistryEntry | None:
    """The registered model or prompt called `name` (MLflow allows only one of the two), or None."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return ModelRegistryEntry(client, name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"cannot read registered model '{name}': {e.message}") from e
    if client.get_prompt(name) is not None:
        return PromptRegistryEntry(client, name)
    return None


def open_entry(client: MlflowClient, name: str) -> RegistryEntry:
    entry = find_entry(client, name)
    if entry is None:
        known = sorted(e.name for e in list_entries(client))
        shown = ", ".join(known[:30]) + (" …" if len(known) > 30 else "")
        raise RegistryError(f"'{name}' is neither a registered model nor a prompt (registered: {shown or 'none'})")
    return entry


def list_entries(client: MlflowClient) -> list[RegistryEntry]:
    """Every registered model and prompt, models first."""
    entries: list[RegistryEntry] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        entries += [ModelRegistryEntry(client, m.name) for m in page]
        token = page.token
        if not token:
            break
    token = None
    while True:
        page = client.search_prompts(page_token=token)
        entries += [PromptRegistryEntry(client, p.name) for p in page]
        token = page.token
        if not token:
            return entries


# --- aliases with history ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasMove:
    name: str
    alias: str
    previous: str | None  # the version the alias pointed at before, None if it was new
    version: str
    action: str  # promote | rollback | unchanged

    def __str__(self) -> str:
        if self.action == "unchanged":
            return f"{self.name}@{self.alias} already points at version {self.version}"
        was = f"version {self.previous}" if self.previous else "nothing"
        return f"{self.name}@{self.alias}: {was} -> version {self.version} ({self.action})"


def check_alias(alias: str) -> None:
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(
            f"'{alias}' is not a usable alias: letters, digits, '_' and '-', and not 'latest' or v<number> "
            f"(those mean versions)"
        )


def _stack(alias: str, tags: dict[str, str]) -> list[str]:
    try:
        stack = json.loads(tags.get(STACK_TAG + alias, "[]"))
    except json.JSONDecodeError:
        stack = []
    return [str(v) for v in stack] if isinstance(stack, list) else []


def _save(entry: RegistryEntry, alias: str, stack: list[str], tags: dict[str, str], move: AliasMove) -> None:
    entry.set_tag(STACK_TAG + alias, json.dumps(stack[-STACK_KEEP:]))
    try:
        log = json.loads(tags.get(LOG_TAG, "[]"))
    except json.JSONDecodeError:
        log = []
    log.append(
        {
            "at": now_iso(),
            "alias": alias,
            "action": move.action,
            "from": move.previous,
            "to": move.version,
            "by": _user(),
        }
    )
    entry.set_tag(LOG_TAG, json.dumps(log[-LOG_KEEP:]))


def promote(client: MlflowClient, name: str, version: str | int, alias: str = DEFAULT_ALIAS) -> AliasMove:
    """Point `alias` of model or prompt `name` at `version`, remembering where it pointed before."""
    check_alias(alias)
    entry = open_entry(client, name)
    version = str(version)
    versions = entry.versions()
    if version not in versions:
        raise RegistryError(f"'{name}' has no version {version} (versions: {', '.join(versions) or 'none'})")
    tags = entry.tags()
    current = entry.aliases().get(alias)
    stack = _stack(alias, tags)
    if current and (not stack or stack[-1] != current):
        stack.append(current)  # moved outside imagefab: remember it
    if current == version:
        return AliasMove(name, alias, current, version, "unchanged")
    entry.set_alias(alias, version)
    stack.append(version)
    move = AliasMove(name, alias, current, version, "promote")
    _save(entry, alias, stack, tags, move)
    return move


def rollback(client: MlflowClient, name: str, alias: str = DEFAULT_ALIAS) -> AliasMove:
    """Point `alias` back at the version it pointed at before the last promotion."""
    check_alias(alias)
    entry = open_entry(client, name)
    aliases = entry.aliases()
    current = aliases.get(alias)
    if current is None:
        shown = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "none"
        raise RegistryError(f"'{name}' has no alias '{alias}' to roll back (aliases: {shown})")
    tags = entry.tags()
    stack = _stack(alias, tags)
    if not stack or stack[-1] != current:
        stack.append(current)
    if len(stack) < 2:
        raise RegistryError(f"{name}@{alias} has no earlier version to roll back to (it has only pointed at {current})")
    stack.pop()
    target = stack[-1]
    if target not in entry.versions():
        raise RegistryError(
            f"{name}@{alias} pointed at version {target} before {current}, but version {target} "
            f"no longer exists; promote a version instead"
        )
    entry.set_alias(alias, target)
    move = AliasMove(name, alias, current, target, "rollback")
    _save(entry, alias, stack, tags, move)
    return move


def alias_log(client: MlflowClient, name: str) -> list[dict]:
    """Every recorded alias move of `name`, oldest first: {at, alias, action, from, to, by}."""
    try:
        return json.loads(open_entry(client, name).tags().get(LOG_TAG, "[]"))
    except json.JSONDecodeError:
        return []


def check_name(name: str, what: str) -> None:
    if not NAME.match(name):
        raise RegistryError(f"'{name}' is not a valid {what} name: letters, digits, '_', '.', '-' (at most 128)")
