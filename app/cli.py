"""The `imagefab` command.

imagefab demo                         build the offline models if missing, run a real bulk job
imagefab run SPEC [--output URI]      the bulk job on a local Ray (or RAY_ADDRESS's cluster); --json
imagefab validate SPEC [--json]       check a spec, its input and its models without rendering
imagefab spec schema                  the spec's JSON Schema, for editors and CI
imagefab models list|build|verify     the model catalog
imagefab regenerate IMAGE_ID          render a catalogued image again and compare the bytes
imagefab catalog [--output URI]       counts by run and status, straight from the Parquet catalog; --json
imagefab catalog compact [--older-than 1h]   merge each partition's batch files into one
imagefab verify FILE... [--json]      C2PA manifest, invisible watermark (-> catalog row), infotext
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _env_defaults() -> None:
    # Local use: Ray's token auth off for the loopback head, no usage reporting, no hub lookups.
    for key, value in (
        ("RAY_AUTH_MODE", "disabled"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0"),
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
    ):
        os.environ.setdefault(key, value)


def cmd_run(args: argparse.Namespace) -> int:
    from jobs import generate

    return generate.run_from_args(args)


def validation_report(spec_path: str, overrides: list[str]) -> dict:
    """What `imagefab validate` found: the resolved models, routing, input and output of a valid
    spec. Raises the spec's, models' or registry's own error when it is not valid."""
    from app.models.catalog import ModelCatalog
    from app.plan import check_input, input_columns, resolve_models, row_lora_names
    from jobs.generate import resolve_registry, spec_from_args

    spec = spec_from_args(argparse.Namespace(spec=spec_path, set=overrides, output=None, limit=None))
    spec, versions = resolve_registry(spec)
    columns = input_columns(spec)
    check_input(spec, columns)
    catalog = versions.merge_into(ModelCatalog.load(spec.model.catalog))
    models = resolve_models(spec, catalog, row_lora_names(spec, columns))
    versions.check_models(models)
    unknown = sorted(row_lora_names(spec, columns) - set(models.loras))
    bad = {**{n: f"unknown LoRA '{n}'" for n in unknown}, **models.lora_problems}
    combinations = {}
    for name, combo in spec.effective_combinations().items():
        base = models.bases[combo.base]
        combinations[name] = {
            "steps": combo.steps,
            "guidance": combo.guidance,
            "scheduler": combo.scheduler,
            "fuse_loras": combo.fuse_loras,
            "base": {"name": base.name, "version": base.version, "sha256": base.sha256},
            "loras": [
                {
                    "name": models.loras[lo.name].name,
                    "version": models.loras[lo.name].version,
                    "weight": lo.weight,
                    "sha256": models.loras[lo.name].sha256,
                }
                for lo in combo.loras
            ],
        }
    routing = (
        f"A/B over {', '.join(spec.ab_test.combinations)}"
        if spec.ab_test
        else (
            f"tier column '{spec.tiers.column}', default tier '{spec.default_tier}'"
            if spec.tiers.column
            else f"every row -> '{spec.tiers.routes.get(spec.default_tier, spec.default_tier)}'"
        )
    )
    return {
        "spec": spec_path,
        "valid": True,
        "registry": [{"field": ref.field, "resolved": ref.describe()} for ref in versions.refs],
        "input": {"path": spec.input.path, "format": spec.input.resolved_format, "columns": list(columns)},
        "combinations": combinations,
        "routing": routing,
        "render": {
            "mode": spec.image.mode,  # a row's `mode` column may name another
            "width": spec.size.width,
            "height": spec.size.height,
            "targets": list(spec.image.targets) if spec.image.mode == "outpaint" else [],
            "images_per_row": spec.images_per_row,
            **(
                {
                    "accepted_per_row": spec.variations.accepted_per_row,
                    "max_attempts_per_row": spec.variations.attempts_per_row,
                }
                if spec.variations.accepted_per_row
                else {}
            ),
        },
        "output": spec.output.uri,
        "warnings": [f"rows asking for LoRA '{name}' will fail: {why}" for name, why in sorted(bad.items())]
        + versions.warnings(),  # template versions deprecated in the registry
    }


FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*|\[\d+\])*): ")


def validation_errors(error: Exception) -> list[dict]:
    """An invalid spec's problems as {field, message}; field is null where no field is to blame."""
    problems = getattr(error, "problems", None)
    if problems:
        return [{"field": path or None, "message": msg} for path, msg in problems]
    text = str(error)
    match = FIELD_PREFIX.match(text)
    if match and "/" not in match.group(1):
        return [{"field": match.group(1), "message": text[match.end() :]}]
    return [{"field": None, "message": text}]


def cmd_validate(args: argparse.Namespace) -> int:
    from app.models.digest import ModelFileError
    from app.registry import RegistryError
    from app.spec import SpecError

    if not args.json:
        return print_validation(validation_report(args.spec, args.set))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            report = validation_report(args.spec, args.set)
    except (SpecError, ModelFileError, RegistryError) as e:
        print(json.dumps({"spec": args.spec, "valid": False, "errors": validation_errors(e)}))
        return EXIT_BAD_INPUT
    print(json.dumps(report))
    return 0


def print_validation(report: dict) -> int:
    for ref in report["registry"]:
        print(f"  registry {ref['field']}: {ref['resolved']}")
    inp = report["input"]
    print(f"{report['spec']}: valid")
    print(f"  input   {inp['path']} ({inp['format']}; columns: {', '.join(inp['columns'])})")
    for name, combo in report["combinations"].items():
        print(
            f"  combination {name}: {combo['steps']} steps, guidance {combo['guidance']}, {combo['scheduler']}"
            + (", LoRAs fused" if combo["fuse_loras"] else "")
        )
        base = combo["base"]
        print(f"    base  {base['name']} v{base['version']} sha256 {base['sha256'][:16]}…")
        for lo in combo["loras"]:
            print(f"    lora  {lo['name']} v{lo['version']} @ {lo['weight']:g} sha256 {lo['sha256'][:16]}…")
    render = report["render"]
    print(f"  routing {report['routing']}")
    size = {
        "txt2img": f"{render['width']}x{render['height']}",
        "img2img": f"img2img at {render['width']}x{render['height']}",
        "inpaint": "inpaint at each input's own size",
        "outpaint": "outpaint to " + ", ".join(render["targets"]) + " around each input at its own resolution",
        "upscale": "upscale of each input",
    }[render["mode"]]
    per_row = f"{render['images_per_row']} image(s) per row"
    if render.get("accepted_per_row"):
        per_row = f"{render['accepted_per_row']} accepted image(s) per row in at most {render['max_attempts_per_row']} attempts"
        if render["images_per_row"] != render["accepted_per_row"]:
            per_row += f" for each matrix combination, target and strength ({render['images_per_row']} per row)"
    print(f"  render  {size}, {per_row}")
    print(f"  output  {report['output']}")
    for warning in report["warnings"]:
        print(f"  warning {warning}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from app.models.catalog import ModelCatalog

    catalog = ModelCatalog.load(args.catalog)
    if args.action == "list":
        print(f"model catalog: {catalog.origin}; built-in models in {catalog.home}/models")
        for kind, title in (("base", "base models"), ("lora", "LoRAs")):
            print(title)
            for name in catalog.names(kind):
                e = catalog.entries[name]
                extra = f" (for {e.base})" if e.base else ""
                print(f"  {name:16s} v{e.version:5s} {e.source}{extra}")
        return 0
    failed = 0
    for kind in ("base", "lora"):
        for name in catalog.names(kind):
            e = catalog.entries[name]
            if e.source_kind == "hub" and args.action == "build":
                continue  # nothing to build; `verify` reports whether it is cached
            try:
                r = catalog.resolve_base(name) if kind == "base" else catalog.resolve_lora(name)
                print(f"  ok    {name:16s} sha256 {r.sha256[:16]}…  {r.path}")
            except Exception as err:  # report every model, then fail
                failed += e.source_kind != "hub"
                print(f"  {'skip' if e.source_kind == 'hub' else 'FAIL'}  {name:16s} {err}")
    return 1 if failed else 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    from app.regenerate import regenerate

    report = regenerate(args.image_id, args.output, args.catalog)
    if args.save:
        from PIL import Image

        Image.fromarray(report.pixels).save(args.save)
    verdict = "identical" if report.identical else "DIFFERENT"
    print(f"{report.image_id}: {verdict} (batch of {report.batch_size} on {report.accelerator})")
    print(f"  catalog sha256  {report.expected_sha256}")
    print(f"  now     sha256  {report.actual_sha256}")
    if report.max_abs_diff >= 0:
        print(f"  max pixel difference from the stored file: {report.max_abs_diff}")
    return 0 if report.identical else 1


def cmd_catalog(args: argparse.Namespace) -> int:
    if args.action == "compact":
        from app.catalog.compact import cli_compact

        return cli_compact(args.output, args.older_than)
    import duckdb

    from app.storage import OutputStore

    root = OutputStore.at(args.output)
    if not root.is_local:
        raise SystemExit("imagefab catalog reads local outputs; use analysis/ for object storage")
    pattern = f"{root.uri}/catalog/**/*.parquet"
    if not list(Path(root.uri, "catalog").glob("**/*.parquet")):
        if getattr(args, "json", False):
            print(json.dumps({"output": root.uri, "runs": [], "error": f"no catalog under {root.uri}/catalog"}))
        else:
            print(f"no catalog under {root.uri}/catalog")
        return 1
    con = duckdb.connect()
    rel = con.sql(f"""
        SELECT run_id, status, count(*) AS images, round(avg(sharpness), 1) AS mean_sharpness,
               round(sum(gpu_seconds), 2) AS gpu_s, round(sum(cost_usd), 6) AS cost_usd
        FROM read_parquet('{pattern}', hive_partitioning = true, union_by_name = true)
        GROUP BY ALL ORDER BY run_id, status""")
    if getattr(args, "json", False):
        rows = [dict(zip(rel.columns, row)) for row in rel.fetchall()]
        print(json.dumps({"output": root.uri, "runs": rows}))
    else:
        print(rel)
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from app.spec import JobSpec

    schema = JobSpec.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "imagefab job spec"}
    print(json.dumps(schema, indent=2))
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("imagefab")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


# The demo's run names its models, template and QC settings through MLflow aliases, the way a
# team's specs do once versions are managed there.
DEMO_REFERENCES = {
    "model.base": "models:/tiny-sdxl@production",
    "model.loras": [{"name": "models:/tiny-style@production", "weight": 0.8}],
    "input.prompt_template": "prompts:/ecommerce_studio@production",
    "qc": "qc:/default@production",
}


def cmd_demo(args: argparse.Namespace) -> int:
    spec = Path(args.spec)
    if not spec.exists():
        print(f"imagefab demo: {spec} not found (run it from the repository root)", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("1/4 model catalog (builds the offline tiny SDXL and LoRAs the first time)")
    if cmd_models(argparse.Namespace(action="build", catalog=None)):
        return 1
    from app.registry import make_client, register_builtins, tracking_uri

    print(f"\n2/4 MLflow registry at {tracking_uri()}: models, LoRAs, templates, QC settings (once)")
    register_builtins(make_client(), report=lambda line: print(f"  {line}"))
    from app.models.catalog import default_home
    from app.provenance.devca import NOT_FOR_PUBLISHING, ensure_dev_credentials

    creds = ensure_dev_credentials(default_home())
    made = "created" if creds.created else "kept"
    print(f"  C2PA development CA {made}: {creds.root_ca}\n  {NOT_FOR_PUBLISHING}")
    print(f"\n3/4 bulk job: {spec} -> {args.output}, versions resolved through @production aliases")
    import yaml

    from jobs import generate

    argv = [str(spec), "--output", args.output, "--quiet"]
    for key, value in DEMO_REFERENCES.items():
        argv += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
    rc = generate.main(argv)
    if rc:
        return rc
    print("\n4/4 the catalog, read back with DuckDB  (MLflow UI: make mlflow)")
    return cmd_catalog(argparse.Namespace(output=args.output, action=None, json=False))


def cmd_verify(args: argparse.Namespace) -> int:
    """Per file: the C2PA manifest and its validity, the watermark and its catalog row, the infotext."""
    import json

    from app.catalog.store import CatalogStore
    from app.provenance.verify import verify_file
    from app.storage import OutputStore

    trust = Path(args.trust).read_bytes() if args.trust else None
    rows_cache: list[dict] | None = None

    def lookup(payload: str) -> list[dict]:
        nonlocal rows_cache
        if rows_cache is None:
            table = CatalogStore(OutputStore.at(args.output)).read(["image_id", "status", "uri", "run_id"])
            rows_cache = table.to_pylist()
        return [row for row in rows_cache if row["image_id"].startswith(payload)]

    bad = 0
    for file in args.files:
        if not Path(file).is_file():
            print(f"imagefab verify: {file}: no such file", file=sys.stderr)
            bad += 1
            continue
        report = verify_file(file, trust_anchors=trust, lookup=lookup)
        manifest = report["c2pa"]
        bad += manifest is not None and not manifest["valid"]
        if args.json:
            print(json.dumps({k: report[k] for k in ("file", "c2pa", "watermark", "infotext")}, ensure_ascii=False))
        else:
            print(report["file"])
            for line in report["summary"]:
                print(f"  {line}")
            if report["infotext"]:
                print("  " + report["infotext"].replace("\n", "\n  "))
    return 1 if bad else 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from app.raycluster import connect_or_start_local
    from app.serve.app import build_app
    from app.serve.config import load_serve_config
    from app.serve.shutdown import STOP_MARGIN_S, StopSignals, stop_serving

    config = load_serve_config(
        args.config, host=args.host, port=args.port, output_uri=args.output, shutdown_grace_s=args.shutdown_grace_s
    )
    config.check_bind()  # before starting anything: no keyless server on a public address
    # A local Ray gets a dashboard (on loopback) when the job runner runs: Ray's job submission
    # API, which starts asynchronous jobs, is served by it. A cluster brings its own.
    if config.jobs.runner:
        how = connect_or_start_local(include_dashboard=True, dashboard_host="127.0.0.1")
    else:
        how = connect_or_start_local(include_dashboard=False)
    grace = config.shutdown_grace_s
    # Installed before Serve starts: a signal while it starts interrupts the start (KeyboardInterrupt)
    # and stops what was started, the same way.
    signals = StopSignals().install()
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name="imagefab", route_prefix="/")
        signals.serving()
        print(
            f"imagefab serving on http://{config.host}:{config.port}  (docs: /docs, health: /healthz; "
            f"Ctrl-C stops: requests in flight get {grace:g} s)",
            flush=True,
        )
        name = signals.wait()
    except KeyboardInterrupt:
        name = signals.name or "SIGINT"
    print(
        f"imagefab serve: {name}: stopping within {grace + STOP_MARGIN_S:g} s (no new requests; "
        f"those in flight get {grace:g} s; Ctrl-C again stops at once)",
        file=sys.stderr,
        flush=True,
    )
    report = stop_serving(grace, again=signals.again)
    print(report.line(), file=sys.stderr, flush=True)
    if how == "local":  # the Ray this process started, and the jobs on it, end with it
        ray.shutdown()
    signals.restore()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jobs.options import add_run_arguments

    p = argparse.ArgumentParser(prog="imagefab", description="Production image generation on Ray.")
    p.add_argument("--version", action="version", version=f"imagefab {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a bulk job (the options of python -m jobs.generate)")
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a spec, its input and models")
    v.add_argument("spec")
    v.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    v.add_argument("--json", action="store_true", help="the result as one JSON object on stdout (errors too)")
    v.set_defaults(func=cmd_validate)

    sp = sub.add_parser("spec", help="the job spec's JSON Schema (for editors and CI)")
    sp.add_argument("action", choices=["schema"])
    sp.set_defaults(func=cmd_spec)

    m = sub.add_parser("models", help="list, build or verify the model catalog")
    m.add_argument("action", choices=["list", "build", "verify"])
    m.add_argument("--catalog", help="a user model catalog YAML merged over the built-in one")
    m.set_defaults(func=cmd_models)

    g = sub.add_parser("regenerate", help="render a catalogued image again and compare")
    g.add_argument("image_id")
    g.add_argument("--output", default="outputs", help="the output URI holding the catalog")
    g.add_argument("--catalog", help="user model catalog")
    g.add_argument("--save", help="write the regenerated image to this PNG path")
    g.set_defaults(func=cmd_regenerate)

    c = sub.add_parser("catalog", help="counts by run and status; `catalog compact` merges batch files")
    c.add_argument("action", nargs="?", choices=("compact",), help="compact: merge each partition's files into one")
    c.add_argument("--older-than", default="1h", help="compact: only partitions with no file newer than this (0: all)")
    c.add_argument("--output", default="outputs")
    c.add_argument("--json", action="store_true", help="the counts as one JSON object on stdout")
    c.set_defaults(func=cmd_catalog)

    d = sub.add_parser("demo", help="set up and run a real bulk job on the embedded defaults")
    d.add_argument("--spec", default="specs/ecommerce.yaml")
    d.add_argument("--output", default="outputs")
    d.set_defaults(func=cmd_demo)

    ve = sub.add_parser("verify", help="provenance of image files: C2PA manifest, invisible watermark, infotext")
    ve.add_argument("files", nargs="+", metavar="FILE")
    ve.add_argument("--json", action="store_true", help="one JSON object per file: file, c2pa, watermark, infotext")
    ve.add_argument("--output", default="outputs", help="the output URI whose catalog the watermark is looked up in")
    ve.add_argument("--trust", help="PEM file of trusted CA certificates (e.g. the development root CA)")
    ve.set_defaults(func=cmd_verify)

    sv = sub.add_parser("serve", help="serve the HTTP API (native, OpenAI, AUTOMATIC1111) with Ray Serve")
    sv.add_argument("--config", help="serve config YAML (default: built-in defaults, tiny models)")
    sv.add_argument("--host", help="bind address (default 127.0.0.1; others need API keys)")
    sv.add_argument("--port", type=int, help="port (default 8000)")
    sv.add_argument("--output", help="output URI for images and the catalog (default: outputs)")
    sv.add_argument(
        "--shutdown-grace-s",
        type=float,
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM, how long requests in flight may finish before the replicas are stopped "
        "(default 30; config: shutdown_grace_s)",
    )
    sv.set_defaults(func=cmd_serve)

    from analysis.cli import add_analysis_cli, add_review_cli
    from app.jobs_cli import add_jobs_cli
    from app.registry import add_registry_cli

    add_registry_cli(sub)
    add_analysis_cli(sub)
    add_review_cli(sub)
    add_jobs_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _env_defaults()
    args = build_parser().parse_args(argv)
    from app.models.digest import ModelFileError
    from app.provenance.signing import SigningError
    from app.raycluster import ClusterUnreachable
    from app.regenerate import RegenerateError
    from app.registry import RegistryError
    from app.spec import SpecError
    from app.storage import StorageError

    try:
        return args.func(args)
    except (
        SpecError,
        ModelFileError,
        StorageError,
        RegenerateError,
        RegistryError,
        ClusterUnreachable,
        SigningError,
    ) as e:
        print(f"imagefab: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
