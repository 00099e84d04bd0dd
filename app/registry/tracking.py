"""A bulk run as an MLflow run, built from what the run left behind: spec, summary, catalog rows.

`track_run` needs no Ray: the catalog rows (a pyarrow table of the run's rows) carry every
outcome, score, cost and file. It logs

- params: the spec as run, flattened (`model.loras.0.name`, `qc.min_sharpness`, …)
- tags: the imagefab run id and name, the models and template used, what each registry reference
  resolved to (`imagefab.ref.*`)
- the input rows as an MLflow dataset (`mlflow.data.from_pandas`, source = the input path)
- metrics: images/s, acceptance rate overall, per base + LoRA stack and per template, cost per
  accepted image, device and CPU seconds, mean QC scores
- artifacts: spec.yaml, run.json, resolved_versions.json, acceptance.json, a contact sheet of
  accepted / review / rejected thumbnails, QC score histograms

Acceptance rate = accepted / images that got a QC verdict (accepted + review + rejected); rows that
failed before rendering count in `failure_rate` instead. Cost per accepted image = the cost of every
image rendered in the run / accepted images: rejected renders are part of what an accepted one costs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml
from PIL import Image, ImageDraw, ImageFont

from app.registry.errors import RegistryError
from app.registry.resolve import ResolvedVersions
from app.registry.store import experiment_id, make_client
from app.spec import JobSpec, SpecError, parse_spec
from app.storage import OutputStore, StorageError, is_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("imagefab.job")

JOB_EXPERIMENT = "imagefab-bulk"
SERVING_EXPERIMENT = "imagefab-serving"
VERDICTS = ("accepted", "review", "rejected")
SCORES = ("sharpness", "contrast", "exposure", "clip_score")
_STATUS_COLOURS = {"accepted": (46, 139, 87), "review": (218, 165, 32), "rejected": (178, 34, 34)}
_METRIC_KEY_BAD = re.compile(r"[^\w.\- :/]")


def track_run(
    spec: JobSpec,
    summary: Any,
    run_record: Mapping,
    catalog_rows: pa.Table,
    output: OutputStore | str,
    *,
    client: MlflowClient | None = None,
    versions: ResolvedVersions | None = None,
    experiment: str = JOB_EXPERIMENT,
    thumbnails_per_status: int = 12,
) -> str:
    """Log one finished bulk run; returns the MLflow run id.

    `summary`: the job's RunSummary (or its `to_dict()`), None when the run did not finish (the
    MLflow run is then marked FAILED). `run_record`: the run's run.json. `catalog_rows`: the
    catalog rows of this run only.
    """
    from mlflow.entities import Metric, Param

    client = client or make_client()
    output = OutputStore.of(output)
    summary_d = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary or {})
    versions = versions or ResolvedVersions.from_dict(run_record.get("registry"))
    rows = catalog_rows.to_pylist()
    run_id = str(run_record.get("run_id") or summary_d.get("run_id") or "")
    if not run_id:
        raise RegistryError("run.json names no run_id; cannot track the run")

    started = _ms(run_record.get("started_at")) or int(time.time() * 1000)
    tags = {
        "imagefab.run_id": run_id,
        "imagefab.run_name": spec.run_name,
        "imagefab.output": output.uri,
        "imagefab.qc_version": spec.qc_settings.qc_version,
        **_model_tags(rows, run_record),
        **versions.tags(),
    }
    if spec.input.template_name:
        tags["imagefab.template"] = spec.input.template_name
    exp = experiment_id(client, experiment)
    mlrun = client.create_run(exp, start_time=started, tags=tags, run_name=run_id)
    rid = mlrun.info.run_id
    try:
        params = [Param(k, v) for k, v in _flatten(spec.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            client.log_batch(rid, params=params[i : i + 100])
        _log_dataset(client, rid, spec)
        metrics, groups = run_metrics(rows, summary_d)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            client.log_batch(rid, metrics=batch[i : i + 1000])
        client.log_text(rid, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
        client.log_dict(rid, dict(run_record), "run.json")
        client.log_dict(rid, versions.to_dict(), "resolved_versions.json")
        client.log_dict(rid, groups, "acceptance.json")
        if summary_d:
            client.log_dict(rid, summary_d, "summary.json")
        client.log_image(rid, contact_sheet(rows, output, per_status=thumbnails_per_status), "contact_sheet.png")
        client.log_image(rid, qc_histograms(rows, spec), "qc_histograms.png")
        client.set_tag(rid, "imagefab.complete", str(bool(summary_d)).lower())
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    wall = float(summary_d.get("wall_seconds") or 0.0)
    client.set_terminated(
        rid, "FINISHED" if summary_d else "FAILED", end_time=started + int(wall * 1000) if wall else None
    )
    return rid


def track_job_output(
    output_uri: str,
    run_id: str,
    *,
    client: MlflowClient | None = None,
    versions: ResolvedVersions | None = None,
    experiment: str = JOB_EXPERIMENT,
) -> str:
    """`track_run` from what a job wrote: runs/<run_id>/run.json, summary.json and the catalog."""
    import pyarrow.dataset as pads

    from app.catalog.store import CatalogStore

    output = OutputStore.at(output_uri)
    try:
        record = json.loads(output.read_bytes(f"runs/{run_id}/run.json"))
    except (StorageError, json.JSONDecodeError) as e:
        raise RegistryError(f"run {run_id}: no readable run.json under {output.uri}/runs/ ({e})") from None
    try:
        summary = json.loads(output.read_bytes(f"runs/{run_id}/summary.json"))
    except StorageError:
        summary = None  # the run did not finish; what it wrote is still worth a look
    spec = _recorded_spec(record["spec"], f"{output.uri}/runs/{run_id}/run.json")
    rows = CatalogStore(output).read(filter=pads.field("run_id") == run_id)
    return track_run(spec, summary, record, rows, output, client=client, versions=versions, experiment=experiment)


def track_job_output_or_warn(output_uri: str, run_id: str, versions: ResolvedVersions | None = None) -> str | None:
    """`track_job_output` at the end of a job: a failure is logged with the command that redoes
    it, not raised (the images and the catalog are written by then). The MLflow run id, or None."""
    try:
        mlflow_run = track_job_output(output_uri, run_id, versions=versions)
    except Exception as e:
        log.warning(
            "run %s: MLflow tracking failed (%s); retry with: imagefab registry track %s %s",
            run_id,
            e,
            output_uri,
            run_id,
        )
        return None
    log.info("run %s: logged to MLflow as run %s", run_id, mlflow_run)
    return mlflow_run


def _recorded_spec(data: dict, where: str) -> JobSpec:
    """The spec in a run.json. A full dump of a spec with `combinations` also holds the default
    `model` section, which the spec refuses beside them: drop it and validate again."""
    try:
        return parse_spec(data, where=where)
    except SpecError:
        if not data.get("combinations"):
            raise
        return parse_spec({k: v for k, v in data.items() if k != "model"}, where=where)


def record_serving(
    versions: ResolvedVersions,
    *,
    client: MlflowClient | None = None,
    deployment: str = "imagefab-serve",
    experiment: str = SERVING_EXPERIMENT,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Record that `deployment` now serves these versions: a run tagged with each, returns its id."""
    client = client or make_client()
    exp = experiment_id(client, experiment)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    tags = {"imagefab.deployment": deployment, **versions.tags(), **(extra_tags or {})}
    run = client.create_run(exp, run_name=f"{deployment}-{stamp}", tags=tags)
    client.log_dict(run.info.run_id, versions.to_dict(), "resolved_versions.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


# --- metrics ---------------------------------------------------------------------------------------


def run_metrics(rows: list[dict], summary: Mapping) -> tuple[dict[str, float], dict]:
    """Metrics of a run's catalog rows (+ the summary's throughput), and per-group counts."""
    counts = {s: 0 for s in (*VERDICTS, "failed")}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    judged = sum(counts[s] for s in VERDICTS)
    total = len(rows)
    cost = sum(r.get("cost_usd") or 0.0 for r in rows)
    m: dict[str, float] = {
        "images": total,
        **counts,
        "gpu_seconds": sum(r.get("gpu_seconds") or 0.0 for r in rows),
        "cpu_seconds": sum(r.get("cpu_seconds") or 0.0 for r in rows),
        "cost_usd": cost,
    }
    if judged:  # no rate at all rather than a 0 % that nothing was measured for
        m.update(
            acceptance_rate=counts["accepted"] / judged,
            review_rate=counts["review"] / judged,
            rejection_rate=counts["rejected"] / judged,
        )
    if total:
        m["failure_rate"] = counts["failed"] / total
    if counts["accepted"]:
        m["cost_per_accepted_image_usd"] = cost / counts["accepted"]
    if summary:
        m["images_per_second"] = float(summary.get("images_per_second") or 0.0)
        m["wall_seconds"] = float(summary.get("wall_seconds") or 0.0)
    for score in SCORES:
        values = [v for r in rows if r["status"] in VERDICTS if (v := r.get(score)) is not None and math.isfinite(v)]
        if values:
            m[f"qc/{score}_mean"] = sum(values) / len(values)

    groups: dict[str, dict[str, dict]] = {"combination": {}, "template": {}}
    for r in rows:
        for kind, label in (("combination", combination_label(r)), ("template", template_label(r))):
            g = groups[kind].setdefault(label, {**{s: 0 for s in (*VERDICTS, "failed")}, "cost_usd": 0.0})
            g[r["status"]] = g.get(r["status"], 0) + 1
            g["cost_usd"] += r.get("cost_usd") or 0.0
            if r.get("combination"):
                g.setdefault("named", set()).add(r["combination"])
    for kind, by_label in groups.items():
        for label, g in by_label.items():
            judged = sum(g[s] for s in VERDICTS)
            g["named"] = sorted(g.get("named", ()))
            key = _metric_key(f"{kind}/{label}")
            m[f"images/{key}"] = judged + g["failed"]
            if judged:
                g["acceptance_rate"] = g["accepted"] / judged
                m[f"acceptance_rate/{key}"] = g["acceptance_rate"]
    return m, groups


def combination_label(row: Mapping) -> str:
    """`tiny-sdxl/tiny-style:0.8/tiny-detail:0.5`: the base, then the LoRA stack in order."""
    base = (row.get("base_model") or {}).get("name") or "unknown"
    return "/".join([base, *(f"{lo['name']}:{lo['weight']:g}" for lo in row.get("loras") or [])])


def template_label(row: Mapping) -> str:
    t = row.get("template") or {}
    return f"{t['name']}:{t.get('version') or ''}" if t.get("name") else "no-template"


def _metric_key(text: str) -> str:
    key = _METRIC_KEY_BAD.sub("_", text)
    return re.sub(r"/+", "/", key).strip("/") or "_"


# --- params, tags, dataset --------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, tuple)) else str(value)
    return {_metric_key(prefix): text if len(text) <= 6000 else text[:5990] + "…"}


def _model_tags(rows: list[dict], record: Mapping) -> dict[str, str]:
    """`imagefab.models.base` / `imagefab.models.loras`: every model version the run used."""
    bases = record.get("base_models") or ({"": record["base_model"]} if record.get("base_model") else {})
    loras = record.get("loras") or {}
    tags = {}
    if bases:
        tags["imagefab.models.base"] = ", ".join(
            f"{b['name']} v{b['version']} ({b['sha256'][:12]})" for b in bases.values()
        )
    if loras:
        tags["imagefab.models.loras"] = ", ".join(
            f"{lo['name']} v{lo['version']} ({lo['sha256'][:12]})" for lo in loras.values()
        )
    return tags


def _log_dataset(client: MlflowClient, run_id: str, spec: JobSpec) -> None:
    import pyarrow.dataset as pads
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from app.plan import csv_string_types

    inp = spec.input
    try:
        if inp.resolved_format == "csv":
            import pyarrow.csv as pacsv

            names = pads.dataset(inp.path, format="csv").schema.names
            fmt = pads.CsvFileFormat(
                parse_options=pacsv.ParseOptions(delimiter=inp.delimiter), convert_options=csv_string_types(names)
            )
            table = pads.dataset(inp.path, format=fmt).to_table()
        else:
            table = pads.dataset(inp.path, format="parquet").to_table()
    except (OSError, pa.ArrowInvalid, ValueError) as e:
        raise RegistryError(f"input.path: cannot read {inp.path} for the MLflow dataset ({e})") from e
    if inp.limit:
        table = table.slice(0, inp.limit)
    name = inp.template_name or Path(inp.path).stem
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local file is one
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = from_pandas(table.to_pandas(), source=inp.path, name=name)
    # The run's input as MLflow's Dataset entity, built from the dataset's public to_dict().
    d = dataset.to_dict()
    entity = Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type=d["source_type"],
        source=d["source"],
        schema=d.get("schema"),
        profile=d.get("profile"),
    )
    client.log_inputs(run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "input")])])


def _ms(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso).timestamp() * 1000)
    except ValueError:
        return None


# --- pictures ---------------------------------------------------------------------------------------


def contact_sheet(
    rows: list[dict], output: OutputStore, *, per_status: int = 12, tile: int = 128, columns: int = 6
) -> Image.Image:
    """Thumbnails of up to `per_status` accepted, review and rejected images, labelled."""
    font = ImageFont.load_default()
    label_h, head_h, pad = 30, 24, 4
    sections = []
    for status in VERDICTS:
        chosen = sorted((r for r in rows if r["status"] == status and r.get("uri")), key=lambda r: r["image_id"])
        total = sum(1 for r in rows if r["status"] == status)
        sections.append((status, chosen[:per_status], total))
    width = columns * (tile + pad) + pad
    height = sum(head_h + math.ceil(len(chosen) / columns) * (tile + label_h + pad) for _, chosen, _ in sections)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for status, chosen, total in sections:
        draw.text((pad, y + 6), f"{status}: {len(chosen)} of {total}", fill=_STATUS_COLOURS[status], font=font)
        y += head_h
        for i, r in enumerate(chosen):
            x = pad + (i % columns) * (tile + pad)
            ty = y + (i // columns) * (tile + label_h + pad)
            sheet.paste(_thumbnail(r, output, tile), (x, ty))
            draw.rectangle([x, ty, x + tile - 1, ty + tile - 1], outline=_STATUS_COLOURS[status], width=2)
            sharp = r.get("sharpness")
            detail = f"sharp {sharp:.0f}" if sharp is not None and math.isfinite(sharp) else ""
            reasons = ",".join(r.get("reasons") or [])[:22]
            draw.text((x, ty + tile + 2), f"{r['image_id'][:12]} {detail}", fill="black", font=font)
            draw.text((x, ty + tile + 15), reasons, fill="dimgray", font=font)
        y += math.ceil(len(chosen) / columns) * (tile + label_h + pad)
    return sheet


def _thumbnail(row: Mapping, output: OutputStore, tile: int) -> Image.Image:
    variants = {v["preset"]: v["uri"] for v in row.get("variants") or []}
    uri = variants.get("thumbnail") or row["uri"]  # the small variant when there is one
    try:
        try:
            data = output.read_bytes(output.rel_of(uri))
        except StorageError:  # not under this output (a copied catalog): read the URI itself
            data = OutputStore.at(uri.rsplit("/", 1)[0] if is_uri(uri) else str(Path(uri).parent)).read_bytes(
                uri.rsplit("/", 1)[1]
            )
        with Image.open(io.BytesIO(data)) as opened:
            img = opened.convert("RGB")
            img.thumbnail((tile, tile))
    except (StorageError, OSError):
        img = Image.new("RGB", (tile, tile), (200, 200, 200))
        ImageDraw.Draw(img).text((6, tile // 2 - 6), "missing", fill="black")
    framed = Image.new("RGB", (tile, tile), (240, 240, 240))
    framed.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return framed


def qc_histograms(rows: list[dict], spec: JobSpec | None = None) -> Image.Image:
    """Histograms of the QC scores by verdict, with the spec's thresholds; matplotlib if installed."""
    data = {}
    for score in SCORES:
        by_status = {
            s: [r[score] for r in rows if r["status"] == s and r.get(score) is not None and math.isfinite(r[score])]
            for s in VERDICTS
        }
        if any(by_status.values()):
            data[score] = by_status
    bounds = _thresholds(spec)
    try:
        return _histograms_matplotlib(data, bounds)
    except ImportError:
        return _histograms_pil(data, bounds)


def _thresholds(spec: JobSpec | None) -> dict[str, list[float]]:
    if spec is None:
        return {}
    q = spec.qc_settings
    return {
        "sharpness": [q.min_sharpness, q.review_sharpness],
        "contrast": [q.min_contrast, q.review_contrast],
        "exposure": [q.review_clipped, q.max_clipped],
    }


def _histograms_matplotlib(data: dict, bounds: dict) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = max(1, len(data))
    fig = Figure(figsize=(4 * panels, 3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (score, by_status) in zip(axes, data.items()):
        present = {s: v for s, v in by_status.items() if v}
        ax.hist(
            list(present.values()),
            bins=20,
            stacked=True,
            label=list(present),
            color=[tuple(c / 255 for c in _STATUS_COLOURS[s]) for s in present],
        )
        for b in bounds.get(score, []):
            ax.axvline(b, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(score)
        ax.legend(fontsize=7)
    if not data:
        axes[0].set_title("no QC scores in this run")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _histograms_pil(data: dict, bounds: dict, bins: int = 20) -> Image.Image:
    panel_w, panel_h, pad = 320, 220, 24
    img = Image.new("RGB", (max(1, len(data)) * panel_w, panel_h), "white")
    draw = ImageDraw.Draw(img)
    for p, (score, by_status) in enumerate(data.items()):
        values = [v for vs in by_status.values() for v in vs] + bounds.get(score, [])
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        counts = {s: [0] * bins for s in VERDICTS}
        for s, vs in by_status.items():
            for v in vs:
                counts[s][min(bins - 1, int((v - lo) / span * bins))] += 1
        top = max(1, max(sum(counts[s][i] for s in VERDICTS) for i in range(bins)))
        x0, w = p * panel_w + pad, (panel_w - 2 * pad) / bins
        base_y = panel_h - pad
        for i in range(bins):
            y: float = base_y
            for s in VERDICTS:
                h = counts[s][i] / top * (panel_h - 2 * pad - 10)
                if h:
                    draw.rectangle([x0 + i * w, y - h, x0 + (i + 1) * w - 1, y], fill=_STATUS_COLOURS[s])
                y -= h
        for b in bounds.get(score, []):
            bx = x0 + (b - lo) / span * (panel_w - 2 * pad)
            draw.line([bx, pad, bx, base_y], fill="black")
        draw.text((x0, 4), f"{score}  [{lo:.3g} .. {hi:.3g}]", fill="black")
    return img
