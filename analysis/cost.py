"""The cost model: what an image, an accepted image, a combination and a template cost, and
whether self-hosting beats a hosted image API.

  compute   device seconds × the device's hourly price + CPU seconds (QC, post-processing) × a CPU
            core's hourly price, repriced from the catalog's measured seconds with a PriceTable
            (so `--prices` answers "what if"); the catalog's `cost_usd` holds the write-time price
  storage   bytes of every master and variant × storage_gb_month (GiB-months; rejected masters
            are kept for inspection, so they count)
  accepted  rejected and review renders cost device time too: cost per accepted image is the
            whole cost over the accepted images
  API       a hosted API charges per image (GBP, converted at usd_per_gbp). An always-on GPU node
            costs a fixed amount a month whatever it renders; each accepted image adds its CPU
            work and a month of storage. Break-even: fixed / (API price − marginal cost), and
            whether one node can render that many at the measured device seconds per accepted image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import duckdb
import pyarrow as pa

from analysis.views import AnalysisError, one_row
from app.cost import PriceTable

GIB = 2**30


@dataclass(frozen=True)
class ApiComparison:
    api_gbp: float
    api_usd: float
    self_hosted_usd_per_accepted: float | None  # on-demand, paying only for the seconds used
    ratio: float | None  # self-hosted / API
    marginal_usd: float  # per accepted image on an always-on node: CPU work + a month of storage
    break_even_images_per_month: float | None  # None: the API is never dearer
    node_capacity_per_month: float | None  # accepted images one node renders in a month
    node_reaches_break_even: bool | None


@dataclass(frozen=True)
class CostReport:
    scope: str  # a run_id or "all runs"
    prices_from: str
    images: int
    rendered: int
    accepted: int
    gpu_seconds: float
    cpu_seconds: float
    compute_usd: float
    gpu_usd: float
    cpu_usd: float
    master_bytes: int
    variant_bytes: int
    storage_usd_month: float
    usd_per_image: float | None
    usd_per_accepted: float | None
    storage_usd_month_per_accepted: float | None
    gpu_seconds_per_accepted: float | None
    node_monthly_usd: float
    gpu_node: str
    measured_on: list[str] = field(default_factory=list)  # accelerators the device seconds per accepted image come from
    by_accelerator: list[dict] = field(default_factory=list)
    by_combination: list[dict] = field(default_factory=list)
    by_template: list[dict] = field(default_factory=list)
    api: list[ApiComparison] = field(default_factory=list)
    api_usd: float = 0.0  # what remote generator backends charged
    by_backend: list[dict] = field(default_factory=list)  # diffusers | a1111 | stability | openai

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        money = _money
        lines = [
            f"cost of {self.scope} (prices: {self.prices_from})",
            f"  images        {self.images} ({self.rendered} rendered, {self.accepted} accepted)",
        ]
        for a in self.by_accelerator:
            lines.append(
                f"  device        {a['gpu_seconds']:.1f} s on {a['accelerator'] or '(none)'} at "
                f"${a['hourly_usd']:.3f}/h = {money(a['gpu_usd'])}"
            )
        lines += [
            f"  CPU           {self.cpu_seconds:.1f} s of QC and post-processing = {money(self.cpu_usd)}",
            f"  compute       {money(self.compute_usd)}: {money(self.usd_per_image)} per image, "
            f"{money(self.usd_per_accepted)} per accepted image",
            f"  stored        {_size(self.master_bytes + self.variant_bytes)} (masters {_size(self.master_bytes)}, "
            f"variants {_size(self.variant_bytes)}) = {money(self.storage_usd_month)} a month, "
            f"{money(self.storage_usd_month_per_accepted)} per accepted image",
        ]
        if self.api_usd:
            lines.append(f"  remote APIs   {money(self.api_usd)} charged by remote generator backends")
        for title, rows, key in (
            ("per backend", self.by_backend, "backend"),
            ("per combination", self.by_combination, "model_stack"),
            ("per template", self.by_template, "template"),
        ):
            lines.append(title)
            for r in rows:
                name = r[key] if key != "model_stack" or not r["combination"] else f"{r['combination']}: {r[key]}"
                lines.append(
                    f"  {name:52s} {r['images']:5d} images {r['accepted']:5d} accepted  "
                    f"{money(r['usd_per_image'])}/image  {money(r['usd_per_accepted'])}/accepted"
                )
        node = f"an always-on {self.gpu_node} node at {money(self.node_monthly_usd)} a month"
        lines.append(
            f"against a hosted image API (at ${self.api[0].api_usd / self.api[0].api_gbp:.2f} per £)"
            if self.api
            else "against a hosted image API"
        )
        for c in self.api:
            share = f" ({c.ratio:.2%} of the API price)" if c.ratio is not None else ""
            lines.append(
                f"  £{c.api_gbp:.3f} (${c.api_usd:.4f}) an image: self-hosted on demand "
                f"{money(c.self_hosted_usd_per_accepted)} per accepted image{share}"
            )
            if c.break_even_images_per_month is None:
                lines.append(
                    f"    {node} never breaks even: each image costs {money(c.marginal_usd)} "
                    "beyond the node, no less than the API"
                )
                continue
            reach = ""
            if c.node_capacity_per_month is not None:
                verdict = "can" if c.node_reaches_break_even else "cannot"
                where = ", ".join(self.measured_on)
                caveat = "" if self.gpu_node.upper() in where.upper() else f", not on the {self.gpu_node} node"
                reach = (
                    f"; one node renders at most {c.node_capacity_per_month:,.0f} accepted images a month "
                    f"at {self.gpu_seconds_per_accepted:.2f} device-s each (measured on {where}{caveat}), "
                    f"so it {verdict}"
                )
            lines.append(
                f"    {node} breaks even at {c.break_even_images_per_month:,.0f} accepted images a month{reach}"
            )
        return "\n".join(lines)


def _money(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "$0"
    if abs(x) >= 1:
        return f"${x:,.2f}"
    if abs(x) >= 1e-6:
        return f"${x:.6f}".rstrip("0")
    return f"${x:.2g}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> list[dict]:
    result = con.execute(sql, params)
    rows = result.fetchall()
    names = [d[0] for d in result.description]
    return [dict(zip(names, r)) for r in rows]


def _group_costs(con, key_sql: str, params: dict) -> list[dict]:
    return _rows(
        con,
        f"""
        SELECT {key_sql}, count(*) AS images, count(*) FILTER (outcome <> 'failed') AS rendered,
               count(*) FILTER (outcome = 'accepted') AS accepted,
               sum(usd) AS compute_usd, sum(stored_bytes) AS stored_bytes,
               sum(usd) / nullif(count(*) FILTER (outcome <> 'failed'), 0) AS usd_per_image,
               sum(usd) / nullif(count(*) FILTER (outcome = 'accepted'), 0) AS usd_per_accepted
        FROM image_costs WHERE $run IS NULL OR run_id = $run
        GROUP BY ALL ORDER BY usd_per_accepted DESC NULLS FIRST""",
        params,
    )


def cost_report(
    con: duckdb.DuckDBPyConnection,
    prices: PriceTable,
    run: str | None = None,
    prices_from: str = "defaults",
    source: str = "images",
) -> CostReport:
    """The cost model over a connection from `analysis.connect(output, file_sizes=True)`.
    source: the view or table of images it reads (the report hands it the columns it read once)."""
    if not source.isidentifier():
        raise AnalysisError(f"cost source must be a view or table name, not {source!r}")
    accelerators = [a for (a,) in con.execute(f"SELECT DISTINCT coalesce(accelerator, '') FROM {source}").fetchall()]
    hourly = pa.table(
        {"accelerator": accelerators, "hourly_usd": [prices.device_hourly(a) if a else 0.0 for a in accelerators]}
    )
    con.register("device_prices", hourly)
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW image_costs AS
        SELECT i.*, p.hourly_usd,
               coalesce(gpu_seconds, 0) * p.hourly_usd / 3600 AS gpu_usd,
               coalesce(cpu_seconds, 0) * {prices.cpu_core_hourly!r} / 3600 AS cpu_usd,
               coalesce(i.backend.api_cost_usd, 0) AS api_usd,
               coalesce(gpu_seconds, 0) * p.hourly_usd / 3600 + coalesce(cpu_seconds, 0) * {prices.cpu_core_hourly!r} / 3600
                   + coalesce(i.backend.api_cost_usd, 0) AS usd,
               coalesce(master_bytes, 0) + variant_bytes AS stored_bytes
        FROM {source} i JOIN device_prices p ON coalesce(i.accelerator, '') = p.accelerator""")
    params = {"run": run}
    (total,) = _rows(
        con,
        """
        SELECT count(*) AS images, count(*) FILTER (outcome <> 'failed') AS rendered,
               count(*) FILTER (outcome = 'accepted') AS accepted,
               coalesce(sum(gpu_seconds), 0) AS gpu_seconds, coalesce(sum(cpu_seconds), 0) AS cpu_seconds,
               coalesce(sum(gpu_usd), 0) AS gpu_usd, coalesce(sum(cpu_usd), 0) AS cpu_usd,
               coalesce(sum(api_usd), 0) AS api_usd,
               coalesce(sum(master_bytes), 0)::BIGINT AS master_bytes, coalesce(sum(variant_bytes), 0)::BIGINT AS variant_bytes
        FROM image_costs WHERE $run IS NULL OR run_id = $run""",
        params,
    )
    if not total["images"]:
        raise AnalysisError(f"run {run!r} has no images in this catalog")
    compute = total["gpu_usd"] + total["cpu_usd"] + total["api_usd"]
    storage = (total["master_bytes"] + total["variant_bytes"]) / GIB * prices.storage_gb_month
    accepted, rendered = total["accepted"], total["rendered"]
    per_accepted = compute / accepted if accepted else None
    gpu_s_per_accepted = total["gpu_seconds"] / accepted if accepted else None
    storage_per_accepted = storage / accepted if accepted else None
    marginal = (total["cpu_usd"] / accepted if accepted else 0.0) + (storage_per_accepted or 0.0)
    node_monthly = prices.node_monthly_usd()
    # A node's capacity from the device seconds measured on its own kind of device, where there
    # are any; otherwise from all of them (the text says where they were measured).
    (node_s, node_accepted) = one_row(
        con.execute(
            "SELECT sum(gpu_seconds), count(*) FILTER (outcome = 'accepted') FROM image_costs "
            "WHERE ($run IS NULL OR run_id = $run) AND upper(accelerator) LIKE '%' || upper($node) || '%'",
            {"run": run, "node": prices.gpu_node},
        )
    )
    if node_accepted:
        gpu_s_per_accepted = node_s / node_accepted
    capacity = (prices.hours_per_month * 3600 / gpu_s_per_accepted) if gpu_s_per_accepted else None
    api = []
    for gbp in prices.hosted_api_gbp_per_image:
        usd = gbp * prices.usd_per_gbp
        even = node_monthly / (usd - marginal) if usd > marginal else None
        api.append(
            ApiComparison(
                api_gbp=gbp,
                api_usd=usd,
                self_hosted_usd_per_accepted=per_accepted,
                ratio=per_accepted / usd if per_accepted is not None else None,
                marginal_usd=marginal,
                break_even_images_per_month=even,
                node_capacity_per_month=capacity,
                node_reaches_break_even=(even <= capacity) if even is not None and capacity is not None else None,
            )
        )
    by_accelerator = _rows(
        con,
        """
        SELECT coalesce(accelerator, '') AS accelerator, any_value(hourly_usd) AS hourly_usd, count(*) AS images,
               coalesce(sum(gpu_seconds), 0) AS gpu_seconds, coalesce(sum(gpu_usd), 0) AS gpu_usd
        FROM image_costs WHERE ($run IS NULL OR run_id = $run) AND coalesce(accelerator, '') <> ''
        GROUP BY ALL ORDER BY gpu_seconds DESC""",
        params,
    )
    return CostReport(
        scope=run or "all runs",
        prices_from=prices_from,
        images=total["images"],
        rendered=rendered,
        accepted=accepted,
        gpu_seconds=total["gpu_seconds"],
        cpu_seconds=total["cpu_seconds"],
        compute_usd=compute,
        gpu_usd=total["gpu_usd"],
        cpu_usd=total["cpu_usd"],
        master_bytes=total["master_bytes"],
        variant_bytes=total["variant_bytes"],
        storage_usd_month=storage,
        usd_per_image=compute / rendered if rendered else None,
        usd_per_accepted=per_accepted,
        storage_usd_month_per_accepted=storage_per_accepted,
        gpu_seconds_per_accepted=gpu_s_per_accepted,
        node_monthly_usd=node_monthly,
        gpu_node=prices.gpu_node,
        by_accelerator=by_accelerator,
        measured_on=[
            a["accelerator"]
            for a in by_accelerator
            if not node_accepted or prices.gpu_node.upper() in a["accelerator"].upper()
        ],
        by_combination=_group_costs(con, "coalesce(combination, '') AS combination, model_stack", params),
        by_template=_group_costs(con, "coalesce(template.name, '(no template)') AS template", params),
        api_usd=total["api_usd"],
        by_backend=_group_costs(con, "coalesce(backend.name, 'diffusers') AS backend", params),
        api=api,
    )
