"""`imagefab registry …` and `imagefab mlflow`.

  imagefab registry list                          registered models, QC settings and prompts, with aliases
  imagefab registry history NAME                  versions and every alias move of one entry
  imagefab registry promote NAME VERSION [--alias production]
  imagefab registry rollback NAME [--alias production]   back to the alias's previous target
  imagefab registry register-builtins             catalog models, example templates, default QC (idempotent)
  imagefab registry register-model NAME PATH --kind lora --base tiny-sdxl [--alias candidate]
  imagefab registry register-prompt NAME TEMPLATE [--alias candidate]
  imagefab registry resolve REFERENCE             what models:/…, prompts:/…, qc:/… points at now
  imagefab registry track OUTPUT RUN_ID           log a finished (or broken-off) bulk run to MLflow
  imagefab mlflow [--port 5000]                   the MLflow server over ./mlflow.db

NAME is the MLflow name (`brand-style`, `qc-default`, `ecommerce_studio`) or a reference without
version (`qc:/default`). The store: --tracking-uri, else MLFLOW_TRACKING_URI, IMAGEFAB_MLFLOW_URI,
sqlite:///mlflow.db.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

EXIT_BAD_INPUT = 2


def add_registry_cli(subparsers) -> None:
    """Add `registry` and `mlflow` to the `imagefab` command's subparsers."""
    reg = subparsers.add_parser("registry", help="model, prompt and QC versions in MLflow: promote, rollback, …")
    reg.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, IMAGEFAB_MLFLOW_URI, sqlite:///mlflow.db)"
    )
    sub = reg.add_subparsers(dest="registry_command", required=True)

    sub.add_parser("list", help="every registered model and prompt with its aliases").set_defaults(func=cmd_list)

    h = sub.add_parser("history", help="versions and alias moves of one entry")
    h.add_argument("name")
    h.set_defaults(func=cmd_history)

    p = sub.add_parser("promote", help="point an alias at a version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="production")
    p.set_defaults(func=cmd_promote)

    r = sub.add_parser("rollback", help="point an alias back at its previous version")
    r.add_argument("name")
    r.add_argument("--alias", default="production")
    r.set_defaults(func=cmd_rollback)

    b = sub.add_parser("register-builtins", help="register the catalog's models, the example templates, default QC")
    b.add_argument("--catalog", help="a user model catalog YAML merged over the built-in one")
    b.add_argument("--specs", default="specs", help="folder of spec YAMLs whose templates to register")
    b.add_argument("--alias", default="production", help="alias set on entries that have none yet ('' for none)")
    b.set_defaults(func=cmd_register_builtins)

    m = sub.add_parser("register-model", help="register model files as a new version (idempotent)")
    m.add_argument("name")
    m.add_argument("path", help="a diffusers folder, a LoRA folder or a .safetensors file")
    m.add_argument("--kind", choices=["base", "lora"], required=True)
    m.add_argument("--base", help="LoRAs: the catalog base model they were trained for")
    m.add_argument("--config", help="single-file base models: a diffusers folder with the configs")
    m.add_argument("--catalog", help="a user model catalog YAML (to find --base)")
    m.add_argument("--alias", action="append", default=[], help="aliases to point at the version")
    m.set_defaults(func=cmd_register_model)

    t = sub.add_parser("register-prompt", help="register a {column} template as a new prompt version")
    t.add_argument("name")
    t.add_argument("template")
    t.add_argument("--message", help="commit message")
    t.add_argument("--alias", action="append", default=[])
    t.set_defaults(func=cmd_register_prompt)

    d = sub.add_parser("deprecate", help="mark a template version deprecated: specs that use it warn")
    d.add_argument("name")
    d.add_argument("version")
    d.add_argument("--reason", default="", help="why, and what to use instead")
    d.add_argument("--undo", action="store_true", help="no longer deprecated")
    d.set_defaults(func=cmd_deprecate)

    v = sub.add_parser("resolve", help="what a reference points at now")
    v.add_argument("reference")
    v.set_defaults(func=cmd_resolve)

    k = sub.add_parser("track", help="log a bulk run's outputs as an MLflow run")
    k.add_argument("output", help="the run's output URI")
    k.add_argument("run_id")
    k.add_argument("--experiment", default="imagefab-bulk")
    k.set_defaults(func=cmd_track)

    s = subparsers.add_parser("mlflow", help="the MLflow server (UI + API) over ./mlflow.db on 127.0.0.1:5000")
    s.add_argument("--root", default=".", help="folder holding mlflow.db and mlartifacts/ (default: here)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5000)
    s.set_defaults(func=cmd_mlflow)


# --- commands --------------------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    # A reference file is a few hundred bytes: no download progress bars on the terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from app.registry.store import make_client

    return make_client(args.tracking_uri)


def _guarded(fn):
    """Report registry errors as `imagefab: error: …` with exit code 2, like the other commands."""

    def run(args: argparse.Namespace) -> int:
        from app.registry.errors import RegistryError

        try:
            return fn(args)
        except RegistryError as e:
            print(f"imagefab: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _name(text: str) -> str:
    """`qc:/default` -> qc-default, `models:/x` -> x: NAME may be written as a reference."""
    from app.registry.refs import QC_PREFIX

    for scheme in ("models:/", "prompts:/", "qc:/"):
        if text.startswith(scheme):
            bare = text.removeprefix(scheme).split("@")[0].split("/")[0]
            return QC_PREFIX + bare if scheme == "qc:/" else bare
    return text


@_guarded
def cmd_list(args: argparse.Namespace) -> int:
    from app.registry.store import KIND_TAG, list_entries

    entries = list_entries(_client(args))
    if not entries:
        print("the registry is empty (imagefab registry register-builtins registers the built-in models)")
        return 0
    print(f"{'name':28s} {'kind':9s} {'versions':>8s}  aliases")
    for e in entries:
        kind = e.tags().get(KIND_TAG) or e.kind
        aliases = "  ".join(f"{a}={v}" for a, v in sorted(e.aliases().items()))
        print(f"{e.name:28s} {kind:9s} {len(e.versions()):8d}  {aliases}")
    return 0


@_guarded
def cmd_history(args: argparse.Namespace) -> int:
    from app.registry.store import alias_log, open_entry

    client = _client(args)
    name = _name(args.name)
    entry = open_entry(client, name)
    aliases = entry.aliases()
    print(f"{name} ({entry.tags().get('imagefab.kind') or entry.kind})")
    print("versions")
    for v in entry.versions():
        on = ", ".join(a for a, av in sorted(aliases.items()) if av == v)
        print(f"  {v:>4s}  {_version_line(client, entry, v)}" + (f"  <- {on}" if on else ""))
    log = alias_log(client, name)
    print("alias moves" if log else "alias moves: none recorded")
    for ev in log:
        was = ev.get("from") or "-"
        print(f"  {ev['at']}  {ev['alias']:12s} {was:>4s} -> {ev['to']:<4s} {ev['action']:9s} by {ev.get('by', '?')}")
    return 0


def _version_line(client, entry, version: str) -> str:
    if entry.kind == "prompt":
        pv = client.get_prompt_version(entry.name, version)
        return f"{_when(pv.creation_timestamp)}  {pv.template[:70]!r}"
    mv = client.get_model_version(entry.name, version)
    t = mv.tags
    what = f"qc_version {t['qc_version']}" if t.get("kind") == "qc" else f"sha256 {t.get('sha256', '?')[:16]}…"
    return f"{_when(mv.creation_timestamp)}  {what}"


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "?"


@_guarded
def cmd_promote(args: argparse.Namespace) -> int:
    from app.registry.store import promote

    print(promote(_client(args), _name(args.name), args.version, args.alias))
    return 0


@_guarded
def cmd_rollback(args: argparse.Namespace) -> int:
    from app.registry.store import rollback

    print(rollback(_client(args), _name(args.name), args.alias))
    return 0


@_guarded
def cmd_register_builtins(args: argparse.Namespace) -> int:
    from app.models.catalog import ModelCatalog
    from app.registry.register import register_builtins

    register_builtins(
        _client(args),
        catalog=ModelCatalog.load(args.catalog),
        specs_dir=args.specs,
        alias=args.alias or None,
        report=print,
    )
    return 0


@_guarded
def cmd_register_model(args: argparse.Namespace) -> int:
    from app.models.catalog import ModelCatalog, ModelEntry
    from app.registry.errors import RegistryError
    from app.registry.register import register_model

    if args.kind == "lora" and not args.base:
        raise RegistryError("register-model: a LoRA needs --base (the catalog base model it was trained for)")
    path = Path(args.path).expanduser().resolve()
    source = f"file:{path}" if path.is_file() else str(path)
    entry = ModelEntry(
        name=args.name,
        kind=args.kind,
        source=source,
        base=args.base,
        config=str(Path(args.config).resolve()) if args.config else None,
    )
    print(register_model(_client(args), entry, catalog=ModelCatalog.load(args.catalog), aliases=args.alias))
    return 0


@_guarded
def cmd_register_prompt(args: argparse.Namespace) -> int:
    from app.registry.register import register_prompt

    print(register_prompt(_client(args), args.name, args.template, commit_message=args.message, aliases=args.alias))
    return 0


@_guarded
@_guarded
def cmd_deprecate(args: argparse.Namespace) -> int:
    from app.registry.register import deprecate_prompt

    name = _name(args.name)
    deprecate_prompt(_client(args), name, args.version, args.reason, undo=args.undo)
    state = "no longer deprecated" if args.undo else f"deprecated ({args.reason.strip() or 'deprecated'})"
    print(f"prompt {name} version {args.version}: {state}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    from app.registry.refs import parse_reference
    from app.registry.resolve import resolve_model, resolve_prompt, resolve_qc

    client = _client(args)
    try:
        ref = parse_reference(args.reference)
    except ValueError as e:
        print(f"imagefab: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if ref.scheme == "models":
        entry, rec = resolve_model(client, ref)
        print(f"{rec.describe()}\n  kind {entry.kind}  source {entry.source}  sha256 {entry.sha256}")
    elif ref.scheme == "prompts":
        text, rec = resolve_prompt(client, ref)
        print(
            f"{rec.describe()}\n  template {text!r}" + (f"\n  DEPRECATED: {rec.deprecated}" if rec.deprecated else "")
        )
    else:
        settings, rec = resolve_qc(client, ref)
        print(f"{rec.describe()}\n  {settings.model_dump(mode='json')}")
    return 0


@_guarded
def cmd_track(args: argparse.Namespace) -> int:
    from app.registry.tracking import track_job_output

    rid = track_job_output(args.output, args.run_id, client=_client(args), experiment=args.experiment)
    print(f"run {args.run_id} logged to MLflow as run {rid} (experiment {args.experiment})")
    return 0


def cmd_mlflow(args: argparse.Namespace) -> int:
    """Run the server in the foreground until Ctrl-C."""
    from app.registry.server import start_server, stop_server

    root = Path(args.root).resolve()
    print(
        f"MLflow on http://{args.host}:{args.port}  (store sqlite:///{root / 'mlflow.db'}, "
        f"artifacts {root / 'mlartifacts'}); Ctrl-C stops it"
    )
    proc = start_server(root, args.host, args.port)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
