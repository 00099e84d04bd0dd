"""The bulk job: a spec and a prompt dataset in, images and a Parquet catalog out.

    python -m jobs.generate specs/ecommerce.yaml [--output URI] [--set steps=8] [--limit 10]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.generate SPEC

Flow (docs/ARCHITECTURE.md):
  1. validate the spec, the output location, the input's columns and every model file (sha256)
  2. Ray Data: read the input -> expand rows into render requests (map_batches)
  3. driver: drop duplicates and ids already in the catalog (resume); write failed rows
  4. Ray Data: Generator actor pool (1 GPU each when there are GPUs; CLIP measured there too when
     qc.clip_on_generator says so) -> Finish (QC, post-processing, catalog append) on CPU actors;
     the driver streams the small per-image results into a summary
  5. with a quota (`variations.accepted_per_row`), step 4 runs in rounds in the same Ray session:
     each round renders the next attempts of the rows still short of accepted images, counted
     from the catalog (app/quota.py); one budget ledger and one duplicate index for all rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import yaml

from app.budget import MonthlyBudgetExceeded
from app.catalog.compact import compact_run
from app.catalog.store import CatalogStore
from app.cost import PriceTable
from app.expand import ExpandRows, ResolvedModels
from app.models.catalog import ModelCatalog, default_home
from app.models.digest import ModelFileError
from app.plan import Plan, check_input, csv_string_types, input_columns, resolve_models, row_lora_names, split_plan
from app.progress import RunProgress
from app.provenance.settings import Provenance, build_provenance
from app.provenance.signing import SigningError
from app.raycluster import ClusterUnreachable, connect_or_start_local, ray_data_logs_to_console
from app.registry.errors import RegistryError
from app.request import requests_from_column
from app.spec import JobSpec, SpecError, load_spec
from app.stages import CatalogWrite, Finish
from app.storage import OutputStore, StorageError
from jobs import stage_ref
from jobs.options import add_run_arguments
from jobs.pools import base_of, generator_call_rows, pool_sizes, with_warmup_sizes
from jobs.summary import RunSummary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.split("\n")[0])
    add_run_arguments(p)
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--set {item!r}: expected FIELD=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.output:
        overrides["output.uri"] = args.output
    if args.limit:
        overrides["input.limit"] = args.limit
    return load_spec(args.spec, overrides)


def new_run_id(spec: JobSpec) -> str:
    return f"{spec.run_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


# --- the Ray parts ---------------------------------------------------------------------------------


def _expand_batch(batch: pa.Table, spec: JobSpec, models: ResolvedModels) -> pa.Table:
    return ExpandRows(spec, models)(batch)


def read_input(spec: JobSpec, columns: list[str]):
    import ray.data

    inp = spec.input
    if inp.resolved_format == "csv":
        ds = ray.data.read_csv(
            inp.path,
            convert_options=csv_string_types(columns),
            parse_options=pacsv.ParseOptions(delimiter=inp.delimiter),
        )
    else:
        ds = ray.data.read_parquet(inp.path)
    return ds.limit(inp.limit) if inp.limit else ds


def expand_requests(spec: JobSpec, models: ResolvedModels, columns: list[str]) -> tuple[pa.Table, int]:
    import ray

    from app.expand import OUTPUT_SCHEMA

    ds = read_input(spec, columns).materialize()  # read once: counted here, expanded next
    rows = ds.count()  # a row gives many requests (matrix, seeds, targets, strengths)
    expanded = ds.map_batches(
        _expand_batch,
        fn_kwargs={"spec": spec, "models": models},
        batch_format="pyarrow",
        batch_size=1024,
        zero_copy_batch=True,
    ).materialize()
    tables = [t for t in ray.get(expanded.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables([t.cast(OUTPUT_SCHEMA) for t in tables]) if tables else OUTPUT_SCHEMA.empty_table()
    return table, rows


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run(
    spec: JobSpec,
    run_id: str | None = None,
    quiet: bool = False,
    generator_cls=None,
    track: bool = False,
    verbose: bool = False,
    prices: PriceTable | None = None,
    force: bool = False,
) -> RunSummary:
    """Run the bulk job; `track` logs it as an MLflow run (the CLI does, unless --no-mlflow).

    `prices`: the price table whose `monthly_budgets` the run is checked against before it starts
    (MonthlyBudgetExceeded, unless `force`); what is left of a matching budget caps the run.

    Progress (images done, outcomes, images/s, ETA, cost) goes to stderr unless `quiet`; Ray
    Data's own progress bars and operator logs go to its log file, or the console when `verbose`.

    `generator_cls` replaces the Generator only for capacity benchmarks (benchmarks/): a class
    with the same constructor and batch interface."""
    from ray.data import DataContext

    t0 = time.perf_counter()
    run_id = run_id or new_run_id(spec)
    output = OutputStore.at(spec.output.uri, spec.output.outage_wait_s)
    summary = RunSummary(run_id=run_id, run_name=spec.run_name, output=output.uri)

    # 1. Everything that can be wrong with the spec, its input, models or output, before any work.
    #    Registry references (models:/…@production, prompts:/…, qc:/…) become concrete versions
    #    first: the template may come from the registry, and a later alias move never changes
    #    what this run records.
    spec, versions = resolve_registry(spec)
    for warning in versions.warnings():  # a template version deprecated in the registry
        logging.getLogger(__name__).warning("%s: %s", run_id, warning)
        if not quiet:
            print(f"imagefab: warning: {warning}", file=sys.stderr)
    columns = input_columns(spec)
    check_input(spec, columns)
    output.check_writable()
    # Every model file is hashed and checked here, before Ray starts: a bad one stops the job.
    catalog = versions.merge_into(ModelCatalog.load(spec.model.catalog))
    models = resolve_models(spec, catalog, row_lora_names(spec, columns))
    versions.check_models(models)
    # Signing credentials are loaded and checked here: a missing or unusable key fails the run now.
    provenance = build_provenance(
        spec.provenance, spec.rights, catalog.licences(), default_home(), report=None if quiet else print
    )

    connect_or_start_local(log_to_driver=not quiet)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = True  # each dataset's plan, in Ray Data's log (on the console when verbose)
    # A stage's own exception (a full disk's StorageError) reaches the driver as that exception,
    # not as Ray Data's UserCodeException, whose cause is lost on the way.
    ctx.raise_original_map_exception = True
    ray_data_log = ray_data_logs_to_console(verbose)
    if not (quiet or verbose):
        print(f"Ray Data's operator logs: {ray_data_log} (--verbose shows them here)", file=sys.stderr)

    # 2-3. Expand, then decide what to render.
    requests, summary.input_rows = expand_requests(spec, models, columns)
    store = CatalogStore(output)
    done = store.done_ids()
    plan: Plan = split_plan(requests, done)
    summary.requests, summary.skipped_existing, summary.duplicates = plan.total, plan.skipped, plan.duplicates
    quota = quota_plan(spec, requests, store, output, done) if spec.variations.accepted_per_row else None
    first = quota.next_round() if quota is not None else plan.pending
    monthly = monthly_cap(spec, store, prices, first, force) if prices is not None else None
    _write_run_record(output, run_id, spec, models, versions)
    if plan.failed.num_rows:
        failed = {c: np.asarray(plan.failed.column(c).to_pylist(), dtype=object) for c in plan.failed.column_names}
        summary.add_failed(CatalogWrite(output, run_id, date=summary.date)(failed))

    # 4. Render, QC, post-process, write; with a quota, round after round until it is met.
    budget = None
    if first.num_rows:
        preflight_remote(remote_combinations(spec))  # a rejected key stops the run before any image is rendered
        budget = run_budget(spec, run_id, monthly[0] if monthly else None)
        duplicates = shared_duplicate_index(spec, output, run_id)
        progress = None if quiet else RunProgress(first.num_rows)
        pending = by_combination(first)
        try:
            while pending.num_rows:
                _render(
                    spec,
                    pending,
                    models,
                    output,
                    run_id,
                    summary,
                    generator_cls,
                    progress,
                    provenance,
                    budget,
                    duplicates,
                )
                if quota is None or (budget is not None and _stopped(budget)):
                    break
                quota.record(this_run_outcomes(store, run_id))
                pending = by_combination(quota.next_round())
                if progress is not None:
                    progress.total += pending.num_rows
        except StorageError as e:  # raised in a Ray stage: the output filled up or became read-only
            # Its first line: Ray appends its traceback and a note on retries to the message.
            raise StorageError(str(getattr(e, "cause", None) or e).splitlines()[0]) from e
        if progress is not None:
            progress.close()
    if budget is not None:
        import ray

        summary.budget = ray.get(budget.snapshot.remote())
    if monthly:
        summary.monthly_budgets = monthly[1]
    if quota is not None:
        if first.num_rows and quota.rounds:
            quota.record(this_run_outcomes(store, run_id))
        summary.quota = quota.report(stopped_on_budget=summary.stopped_on_budget)
        bad = requests.filter(pc.equal(requests.column("status"), "failed"))
        summary.quota["failed_rows"] = failed_rows(bad, spec.variations.accepted_per_row or 0)
    compact_run(output, summary.date, run_id)  # the run's batch files become one (app/catalog/compact.py)
    summary.wall_seconds = time.perf_counter() - t0
    output.write_bytes(f"runs/{run_id}/summary.json", json.dumps(summary.to_dict(), indent=1).encode())
    if track:
        from app.registry import track_job_output_or_warn

        track_job_output_or_warn(output.uri, run_id, versions)
    return summary


def resolve_registry(spec: JobSpec):
    """The spec with MLflow references made concrete, and what each resolved to."""
    from app.registry.resolve import ResolvedVersions, has_references

    if not has_references(spec):
        return spec, ResolvedVersions()
    from app.registry import make_client, resolve_spec_references

    return resolve_spec_references(spec, make_client(), verify=False)  # resolve_models hashes the files next


def quota_plan(spec: JobSpec, requests: pa.Table, store: CatalogStore, output: OutputStore, done: set[str]):
    """The quota's rounds (app/quota.py) over every attempt that can render, with what the
    catalog holds already (people's review decisions applied)."""
    from app.quota import QuotaPlan, apply_decisions, outcomes_from_catalog
    from app.review import ReviewStore

    attempts = requests.filter(pc.equal(requests.column("status"), "pending"))
    outcomes = outcomes_from_catalog(store.read(["image_id", "status", "reasons", "error"]))
    decisions = {i: d.decision for i, d in ReviewStore(output).latest().items()}
    return QuotaPlan(attempts, spec.variations, apply_decisions(outcomes, decisions), done)


def this_run_outcomes(store: CatalogStore, run_id: str):
    """What the catalog says of this run's images so far."""
    import pyarrow.dataset as pads

    from app.quota import outcomes_from_catalog

    rows = store.read(["image_id", "status", "reasons", "error"], filter=pads.field("run_id") == run_id)
    return outcomes_from_catalog(rows).items()


def failed_rows(failed: pa.Table, wanted: int) -> list[dict]:
    """Input rows that could not become requests (once per row), for the quota's report."""
    out: dict[str, dict] = {}
    for req, error in zip(failed.column("request").to_pylist(), failed.column("error").to_pylist()):
        out.setdefault(req["row_key"], {"row_key": req["row_key"], "accepted": 0, "wanted": wanted, "error": error})
    return list(out.values())


def by_combination(pending: pa.Table) -> pa.Table:
    """Stable sort: within a combination, input order is kept (generators switch stacks rarely)."""
    if not pending.num_rows:
        return pending
    return pending.take(pc.sort_indices(pending, sort_keys=[("combination", "ascending")]))


def monthly_cap(spec: JobSpec, store: CatalogStore, prices: PriceTable, first: pa.Table, force: bool):
    """(what the run may spend, the matching budgets' spend) under the price table's monthly
    budgets for the spec's static tags; None when none applies. MonthlyBudgetExceeded when one is
    spent or the run's estimate would cross it (unless `force`).

    The estimate: the images the run renders first × the catalog's mean cost per rendered image
    (of the same combinations where there are any), capped by the run's own max_cost_usd."""
    from app.budget import MonthlyBudgets, current_month

    budgets = MonthlyBudgets.parse(prices.monthly_budgets)
    if not budgets.matching(spec.static_tags):
        return None
    history = store.read(["tags", "created_at", "cost_usd", "run_id", "status", "combination"])
    spend = budgets.spend(history, current_month())
    rendered = history.filter(pc.not_equal(history.column("status"), "failed"))
    names = sorted({r["combination"] for r in first.column("request").to_pylist()})
    same = rendered.filter(pc.is_in(rendered.column("combination"), pa.array(names, pa.string())))
    basis = same if same.num_rows else rendered
    mean = pc.mean(basis.column("cost_usd")).as_py() if basis.num_rows else 0.0
    estimate = first.num_rows * float(mean or 0.0)
    if spec.budget.max_cost_usd is not None:
        estimate = min(estimate, spec.budget.max_cost_usd)
    left = budgets.check_run(spec.static_tags, spend, estimate, force)
    matching = [s.to_dict() for s in spend if s.budget.matches(spec.static_tags)]
    for m in matching:
        m["estimate_usd"], m["forced"] = estimate, force
    return (left, matching) if left is not None or force else None


def _stopped(budget) -> bool:
    import ray

    return bool(ray.get(budget.snapshot.remote())["stopped"])


def _render(
    spec: JobSpec,
    pending: pa.Table,
    models: ResolvedModels,
    output: OutputStore,
    run_id: str,
    summary: RunSummary,
    generator_cls=None,
    progress: RunProgress | None = None,
    provenance: Provenance | None = None,
    budget=None,
    duplicates: RemotePhashIndex | None = None,
) -> None:
    """One generator actor pool per base model, all feeding one CPU stage (one round of a quota).

    A generator or finisher actor that dies (OOM killer, lost node) is restarted and its batch
    retried on the new actor: Ray Data's actor-pool defaults (max_restarts=-1, max_task_retries=-1;
    setting them through map_batches is deprecated in Ray 2.60). Retrying is safe: image files are
    named by content and a batch's catalog file by its run and image ids, so a retry replaces what
    the dead actor wrote (tests/test_faults.py kills a generator mid-run).
    """
    import ray
    from ray.data import ActorPoolStrategy

    compute = spec.compute
    gpus = cluster_gpus() if compute.device != "cpu" else 0
    # device: cuda on an autoscaling cluster whose GPU nodes are at zero: ask for GPUs anyway
    # (the autoscaler adds them); the pool size cannot come from GPUs that are not there yet.
    use_gpu = gpus > 0 or compute.device == "cuda"
    if use_gpu and not gpus and not compute.generators:
        raise SpecError(
            "compute.generators: the cluster has no GPU up yet; with device: cuda, say how many "
            "generators to start (the autoscaler adds GPU nodes for them)"
        )
    gpus = gpus or (compute.generators or 1)
    cpus = ray.cluster_resources().get("CPU", 1)
    batch = compute.batch_size
    call_rows = generator_call_rows(compute, use_gpu)
    # Combinations on a remote backend render in their own CPU actor pools; the rest here.
    remote = remote_combinations(spec)
    pending, remote_rows = split_remote(pending, remote)
    bases = [base_of(k) for k in pc.unique(pending.column("combination")).to_pylist()]
    bases = sorted(set(bases))
    pools = pool_sizes(bases, pending, compute.generators, gpus)
    # With fewer GPUs than base models, pools run one after another, each with every GPU.
    together = not use_gpu or sum(pools.values()) <= gpus
    # Generators must leave CPU for the QC/post stage, or the dataset can stall.
    gen_cpus = 1.0 if use_gpu else min(float(compute.cpu_threads), max(0.25, cpus - 0.5) / max(1, sum(pools.values())))
    # CLIP on the generator's GPU, right after rendering, or in the QC workers: decided once, told to both.
    clip_on_generator = spec.qc_settings.clip_runs_on_generator(generator_on_cuda=use_gpu)
    # The generator stage is named, not imported (jobs/stage_ref.py): torch and diffusers load in the actors only.
    stage: type
    if clip_on_generator:
        stage, stage_kwargs = stage_ref.GeneratorWithClip, {"qc": spec.qc_settings, "generator_cls": generator_cls}
    else:
        stage, stage_kwargs = generator_cls or stage_ref.Generator, {}

    def budgeted(stage_cls, kwargs: dict, usd_per_image: float | None = None) -> tuple[type, dict]:
        """The stage, or the stage asking the run's budget before each batch (app/budget.py)."""
        if budget is None:
            return stage_cls, kwargs
        from app.budget import Budgeted

        return Budgeted, {"budget": budget, "stage": stage_cls, "stage_kwargs": kwargs, "usd_per_image": usd_per_image}

    def generators_for(base: str):
        rows = pending.filter(
            pc.equal(pc.utf8_slice_codeunits(pending.column("combination"), 0, len(base) + 1), base + "|")
        )
        ds = ray.data.from_arrow([rows.slice(i, call_rows) for i in range(0, rows.num_rows, call_rows)])
        usable = {n: lo for n, lo in models.loras.items() if lo.arch == models.bases[base].arch}
        base_compute = with_warmup_sizes(compute, rows.column("request"))
        cls, kwargs = budgeted(
            stage, {"base": models.bases[base], "loras": usable, "compute": base_compute, **stage_kwargs}
        )
        return ds.map_batches(
            cls,
            fn_constructor_kwargs=kwargs,
            compute=ActorPoolStrategy(size=pools[base] if together else max(1, gpus)),
            batch_size=call_rows,
            batch_format="numpy",
            num_gpus=1 if use_gpu else 0,
            num_cpus=gen_cpus,
            resources={compute.accelerator_resource: 1} if compute.accelerator_resource else None,
        )

    def finish(ds):
        return ds.map_batches(
            Finish,
            fn_constructor_kwargs={
                "qc": spec.qc,
                "postprocess": spec.postprocess,
                "output": output,
                "run_id": run_id,
                "duplicates": duplicates,
                "date": summary.date,
                "clip_on_generator": clip_on_generator,
                "provenance": provenance,
            },
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, compute.qc_workers)),
            batch_size=batch,
            batch_format="numpy",
            num_cpus=0.5,
            resources={compute.qc_resource: 1} if compute.qc_resource else None,
        )

    def remote_for(name: str, rows: pa.Table):
        from app.backends.stage import RemoteGenerator

        combo = remote[name]
        ds = ray.data.from_arrow([rows.slice(i, batch) for i in range(0, rows.num_rows, batch)])
        config = combo.backend_config()
        from app.backends.prices import api_price_usd

        cls, kwargs = budgeted(
            RemoteGenerator,
            {"config": config},
            usd_per_image=api_price_usd(config.backend, config.model, config.price_usd_per_image),
        )
        return ds.map_batches(
            cls,
            fn_constructor_kwargs=kwargs,
            compute=ActorPoolStrategy(size=combo.remote_actors),
            batch_size=batch,
            batch_format="numpy",
            num_gpus=0,  # an HTTP client: no GPU reserved
            num_cpus=0.25,
        )

    stages = []
    if bases and pending.num_rows:
        if together:
            streams = [generators_for(b) for b in bases]
            stages = [finish(streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0])]
        else:
            stages = [finish(generators_for(b)) for b in bases]
    stages += [finish(remote_for(name, rows)) for name, rows in remote_rows.items()]
    summary.generators = sum(pools.values()) if together else max(1, gpus)
    for finished in stages:
        for out in finished.iter_batches(batch_size=None, batch_format="numpy"):
            summary.add_batch(out)
            if progress is not None:
                progress.add_batch(out)
    summary.accelerator = "GPU" if use_gpu else f"CPU ({compute.cpu_threads} thread(s) per generator)"


def run_budget(spec: JobSpec, run_id: str, monthly_left_usd: float | None = None):
    """The run's budget ledger (app/budget.py) as one Ray actor, or None without caps.
    `monthly_left_usd`: what a monthly budget has left, a cost cap of its own."""
    cost_cap = spec.budget.max_cost_usd
    if monthly_left_usd is not None:
        cost_cap = max(0.0, monthly_left_usd) if cost_cap is None else min(cost_cap, max(0.0, monthly_left_usd))
    if cost_cap is None and spec.budget.max_device_seconds is None:
        return None
    import ray

    from app.budget import RunBudget

    actor = ray.remote(num_cpus=0)(RunBudget).options(name=f"budget-{run_id}")
    return actor.remote(cost_cap, spec.budget.max_device_seconds)


def remote_combinations(spec: JobSpec) -> dict:
    """The spec's combinations whose pixels come from a remote backend, by name."""
    return {name: c for name, c in spec.effective_combinations().items() if c.backend != "diffusers"}


def preflight_remote(remote: dict) -> None:
    """One cheap authenticated call per remote combination: a wrong key stops the run here."""
    from app.backends import BackendError, build_backend
    from app.backends.credentials import CredentialError

    for name, combo in remote.items():
        try:
            backend = build_backend(combo.backend_config())
        except (CredentialError, ValueError) as e:
            raise SpecError(f"combinations.{name}: {e}") from None
        try:
            backend.preflight()
        except BackendError as e:
            if e.kind == "auth":
                raise SpecError(
                    f"combinations.{name}: the {combo.backend} backend refused the credentials "
                    f"({combo.credentials or 'none given'}): {e.message}. Nothing was rendered."
                ) from None
            raise SpecError(f"combinations.{name}: the {combo.backend} backend is not usable: {e}") from None
        finally:
            backend.close()


def split_remote(pending: pa.Table, remote: dict) -> tuple[pa.Table, dict[str, pa.Table]]:
    """Pending rows for the diffusers pools, and each remote combination's rows."""
    if not remote:
        return pending, {}
    names = [r.combination for r in requests_from_column(pending.column("request"))]
    local = pending.filter(pa.array([n not in remote for n in names]))
    rows = {name: pending.filter(pa.array([n == name for n in names])) for name in remote}
    return local, {name: t for name, t in rows.items() if t.num_rows}


class RemotePhashIndex:
    """The run's near-duplicate index, held by one Ray actor so every QC worker sees every image.

    The actor answers one call at a time, so of two near-identical images judged by different
    workers exactly one is kept. One call per batch."""

    def __init__(self, handle):
        self.handle = handle

    def query_and_add_many(self, ids, hashes, max_distance, *, reject_distance=None, eligible=None, groups=None):
        import ray

        return ray.get(
            self.handle.query_and_add_many.remote(
                list(ids), list(hashes), max_distance, reject_distance=reject_distance, eligible=eligible, groups=groups
            )
        )


def shared_duplicate_index(spec: JobSpec, output: OutputStore, run_id: str) -> RemotePhashIndex | None:
    """An index loaded with the catalog's hashes (duplicates of earlier runs count too)."""
    import ray

    from app.qc.duplicates import PhashIndex

    if "duplicates" not in spec.qc_settings.enabled:
        return None
    actor = ray.remote(num_cpus=0)(PhashIndex).options(name=f"phash-{run_id}").remote()
    existing = CatalogStore(output).read(["image_id", "phash", "status", "created_at"])
    if existing.num_rows:
        # Ray's typing of an actor handle does not give its methods `.remote`
        ray.get(actor.add_catalog.remote(existing))  # type: ignore[attr-defined]
    return RemotePhashIndex(actor)


def _write_run_record(output: OutputStore, run_id: str, spec: JobSpec, models: ResolvedModels, versions) -> None:
    """The spec as run and the resolved model versions, beside the catalog, for audit."""
    record = {
        "run_id": run_id,
        "spec": spec.model_dump(mode="json", exclude_unset=True),  # re-validates as written
        "registry": versions.to_dict(),
        "base_models": {n: asdict(b) for n, b in models.bases.items()},
        "loras": {n: asdict(lo) for n, lo in models.loras.items()},
        "started_at": datetime.now(UTC).isoformat(),
    }
    output.write_bytes(f"runs/{run_id}/run.json", json.dumps(record, indent=1).encode())


def prices_from_args(args: argparse.Namespace) -> PriceTable | None:
    """The price table of `--prices` (its monthly budgets are checked before the run), or None."""
    path = getattr(args, "prices", None)
    if not path:
        return None
    try:
        return PriceTable.from_yaml(path)
    except (OSError, ValueError) as e:
        raise SpecError(f"--prices: {e}") from None


def main(argv: list[str] | None = None) -> int:
    return run_from_args(parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """The job for parsed options (jobs/options.py); exit 2 on bad input, 1 when images failed.

    With `--json` the summary is the only thing on stdout; everything else goes to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    as_json = getattr(args, "json", False)
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            spec = spec_from_args(args)
            summary = run(
                spec,
                run_id=args.run_id,
                quiet=args.quiet,
                track=not args.no_mlflow,
                verbose=getattr(args, "verbose", False),
                prices=prices_from_args(args),
                force=getattr(args, "force", False),
            )
    except (
        SpecError,
        ModelFileError,
        StorageError,
        RegistryError,
        ClusterUnreachable,
        SigningError,
        MonthlyBudgetExceeded,
    ) as e:
        print(f"imagefab: error: {e}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps(summary.to_dict()) if as_json else summary.render())
    failed, attempted = summary.counts.get("failed", 0), summary.requests - summary.skipped_existing
    if failed and (args.strict or failed >= attempted):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
