"""The bulk job: a spec and a prompt dataset in, images and a Parquet catalog out.

    python -m jobs.generate specs/ecommerce.yaml [--output URI] [--set steps=8] [--limit 10]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.generate SPEC

Flow (docs/ARCHITECTURE.md):
  1. validate the spec, the output location, the input's columns and every model file (sha256)
  2. Ray Data: read the input -> expand rows into render requests (map_batches)
  3. driver: drop duplicates and ids already in the catalog (resume); write failed rows
  4. Ray Data: Generator actor pool (1 GPU each when there are GPUs) -> Finish (QC, post-processing,
     catalog append) on CPU actors; the driver streams the small per-image results into a summary
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import yaml

from app.catalog.store import CatalogStore
from app.expand import ExpandRows, ResolvedModels
from app.models.catalog import ModelCatalog
from app.models.digest import ModelFileError
from app.plan import Plan, check_input, csv_string_types, input_columns, resolve_models, row_lora_names, split_plan
from app.spec import JobSpec, SpecError, load_spec
from app.stages import CatalogWrite, Finish
from app.storage import OutputStore, StorageError

log = logging.getLogger("imagefab.job")


@dataclass
class RunSummary:
    run_id: str
    run_name: str
    output: str
    input_rows: int = 0
    requests: int = 0
    skipped_existing: int = 0
    duplicates: int = 0
    rendered: int = 0
    counts: dict = field(default_factory=lambda: {"accepted": 0, "review": 0, "rejected": 0, "failed": 0})
    gpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    generators: int = 0
    accelerator: str = ""

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": self.images_per_second}

    def render(self) -> str:
        c = self.counts
        return "\n".join([
            f"run {self.run_id}  ({self.run_name})",
            f"  requests      {self.requests}  (skipped, already in catalog: {self.skipped_existing}; "
            f"duplicates in input: {self.duplicates})",
            f"  rendered      {self.rendered} on {self.generators} generator(s) [{self.accelerator}]",
            f"  outcome       accepted {c['accepted']}  review {c['review']}  rejected {c['rejected']}  failed {c['failed']}",
            f"  throughput    {self.images_per_second:.2f} images/s over {self.wall_seconds:.1f} s",
            f"  device time   {self.gpu_seconds:.1f} s   CPU (QC, post) {self.cpu_seconds:.1f} s",
            f"  images        {self.output}/images/",
            f"  catalog       {self.output}/catalog/  (date=…/run_id={self.run_id}/)",
            f"  summary       {self.output}/runs/{self.run_id}/summary.json",
        ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--output", help="output URI (overrides output.uri)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a spec field by dotted path, e.g. --set steps=8 (YAML value)")
    p.add_argument("--limit", type=int, help="only the first N input rows (smoke test)")
    p.add_argument("--run-id", help="run id (default: run_name-UTCSTAMP-random)")
    p.add_argument("--quiet", action="store_true", help="no Ray Data progress bars")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any image failed (default: only when every one did)")
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
    return f"{spec.run_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


# --- the Ray parts ---------------------------------------------------------------------------------

def _expand_batch(batch: pa.Table, spec: JobSpec, models: ResolvedModels) -> dict:
    return ExpandRows(spec, models)(batch)


def read_input(spec: JobSpec, columns: list[str]):
    import ray.data

    inp = spec.input
    if inp.resolved_format == "csv":
        ds = ray.data.read_csv(inp.path, convert_options=csv_string_types(columns),
                               parse_options=pacsv.ParseOptions(delimiter=inp.delimiter))
    else:
        ds = ray.data.read_parquet(inp.path)
    return ds.limit(inp.limit) if inp.limit else ds


def expand_requests(spec: JobSpec, models: ResolvedModels, columns: list[str]) -> tuple[pa.Table, int]:
    import ray

    from app.expand import OUTPUT_COLUMNS

    ds = read_input(spec, columns)
    expanded = ds.map_batches(_expand_batch, fn_kwargs={"spec": spec, "models": models},
                              batch_format="pyarrow", batch_size=1024, zero_copy_batch=True).materialize()
    tables = [t for t in ray.get(expanded.to_arrow_refs()) if t.num_rows]
    schema = pa.schema([(c, pa.string()) for c in OUTPUT_COLUMNS])
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    return table, table.num_rows // spec.variations.seeds_per_row


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run(spec: JobSpec, run_id: str | None = None, quiet: bool = False) -> RunSummary:
    import ray
    from ray.data import DataContext

    t0 = time.perf_counter()
    run_id = run_id or new_run_id(spec)
    output = OutputStore.at(spec.output.uri)
    summary = RunSummary(run_id=run_id, run_name=spec.run_name, output=output.uri)

    # 1. Everything that can be wrong with the spec, its input, models or output, before any work.
    columns = input_columns(spec)
    check_input(spec, columns)
    output.check_writable()
    # Every model file is hashed and checked here, before Ray starts: a bad one stops the job.
    models = resolve_models(spec, ModelCatalog.load(spec.model.catalog), row_lora_names(spec, columns))

    if not ray.is_initialized():
        ray.init(log_to_driver=not quiet)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    # 2-3. Expand, then decide what to render.
    requests, summary.input_rows = expand_requests(spec, models, columns)
    store = CatalogStore(output)
    plan: Plan = split_plan(requests, store.done_ids())
    summary.requests, summary.skipped_existing, summary.duplicates = plan.total, plan.skipped, plan.duplicates
    _write_run_record(output, run_id, spec, models)
    if plan.failed.num_rows:
        failed = {c: np.asarray(plan.failed.column(c).to_pylist(), dtype=object) for c in plan.failed.column_names}
        CatalogWrite(output, run_id)(failed)
        summary.counts["failed"] += plan.failed.num_rows

    # 4. Render, QC, post-process, write.
    if plan.pending.num_rows:
        _render(spec, plan, models, output, run_id, summary)
    summary.wall_seconds = time.perf_counter() - t0
    output.write_bytes(f"runs/{run_id}/summary.json", json.dumps(summary.to_dict(), indent=1).encode())
    return summary


def _render(spec: JobSpec, plan: Plan, models: ResolvedModels, output: OutputStore, run_id: str,
            summary: RunSummary) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from app.generate import Generator

    compute = spec.compute
    gpus = cluster_gpus() if compute.device != "cpu" else 0
    use_gpu = gpus > 0
    pool = compute.generators or (gpus if use_gpu else 1)
    cpus = ray.cluster_resources().get("CPU", 1)
    # Generators must leave CPU for the QC/post stage, or the dataset can stall.
    gen_cpus = 1.0 if use_gpu else min(float(compute.cpu_threads), max(0.5, cpus - 0.5) / pool)
    finish_cpus = 0.5
    batch = compute.batch_size
    pending = plan.pending
    blocks = [pending.slice(i, batch) for i in range(0, pending.num_rows, batch)]
    ds = ray.data.from_arrow(blocks)
    rendered = ds.map_batches(
        Generator,
        fn_constructor_kwargs={"base": models.base, "loras": models.loras, "compute": compute},
        compute=ActorPoolStrategy(size=pool),
        batch_size=batch,
        batch_format="numpy",
        num_gpus=1 if use_gpu else 0,
        num_cpus=gen_cpus,
    )
    finished = rendered.map_batches(
        Finish,
        fn_constructor_kwargs={"qc": spec.qc, "postprocess": spec.postprocess, "output": output, "run_id": run_id},
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, compute.qc_workers)),
        batch_size=batch,
        batch_format="numpy",
        num_cpus=finish_cpus,
    )
    summary.generators = pool
    for out in finished.iter_batches(batch_size=None, batch_format="numpy"):
        for status in out["status"]:
            summary.counts[str(status)] = summary.counts.get(str(status), 0) + 1
        summary.rendered += len(out["status"])
        summary.gpu_seconds += float(np.sum(out["gpu_seconds"]))
        summary.cpu_seconds += float(np.sum(out["cpu_seconds"]))
    summary.accelerator = "GPU" if use_gpu else f"CPU ({compute.cpu_threads} thread(s) per generator)"


def _write_run_record(output: OutputStore, run_id: str, spec: JobSpec, models: ResolvedModels) -> None:
    """The spec as run and the resolved model versions, beside the catalog, for audit."""
    record = {
        "run_id": run_id,
        "spec": spec.model_dump(mode="json"),
        "base_model": asdict(models.base),
        "loras": {n: asdict(lo) for n, lo in models.loras.items()},
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    output.write_bytes(f"runs/{run_id}/run.json", json.dumps(record, indent=1).encode())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
        summary = run(spec, run_id=args.run_id, quiet=args.quiet)
    except (SpecError, ModelFileError, StorageError) as e:
        print(f"imagefab: error: {e}", file=sys.stderr)
        return 2
    print(summary.render())
    failed, attempted = summary.counts.get("failed", 0), summary.requests - summary.skipped_existing
    if failed and (args.strict or failed >= attempted):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
