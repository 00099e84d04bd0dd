"""The CPU stages after the generator, as plain callables over numpy batches.

Each stage names the columns it reads and adds. They import no Ray: `jobs/generate.py` and the
Serve app wire them. A row whose stage fails becomes `failed` with the reason; the others go on.

  Generator            -> pixels, nonfinite, gpu_seconds, accelerator, accelerator_settings, batch_id, batch_size,
                          cond_* (an image-conditioned output's measures: app/conditioning/plan.py MEASURE_COLUMNS)
  (GeneratorWithClip   -> the same + clip_embedding, clip_model, clip_cosines: app/qc/clip_stage.py)
  QualityControl       -> status, reasons, scores, qc_version, cpu_seconds
                          (reads cond_* for the kept-region, seam and upscale checks: app/qc/conditioned.py)
  Postprocess          -> uri, variants, pixel_sha256, rights, cpu_seconds (+), drops pixels
                          (invisible watermark and a signed C2PA manifest in every file it writes)
  CatalogWrite         -> appends catalog rows (`conditioning`: the request's + cond_*); returns
                          image_id, status, gpu_seconds, cpu_seconds, mode, kept_mean_abs, …
  Finish               =  QualityControl -> Postprocess -> CatalogWrite, one Ray stage
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from app.accelerator import AcceleratorSettings
from app.catalog.store import CatalogStore
from app.columns import object_column
from app.conditioning.measures import MEASURE_COLUMNS, Measures
from app.cost import PriceTable
from app.metadata import ImageMetadata
from app.postprocess import PostprocessSettings, encode_master, render_variants
from app.provenance import watermark
from app.provenance.settings import Provenance
from app.provenance.signing import GenerationRecord, Ingredient, ModelRecord, sign_master, sign_variant
from app.qc import QcModels, QcSettings
from app.qc.clip_measures import CLIP_COLUMNS, measure_from_row
from app.qc.conditioned import measures_from_columns
from app.request import RenderRequest, request_at
from app.schedulers import sampler_name
from app.storage import OutputStore, StorageError

SUMMARY_COLUMNS = (
    "image_id",
    "status",
    "gpu_seconds",
    "cpu_seconds",
    "cost_usd",
    "combination",
    "base_model",
    "generator_id",
    "lora_switches",
    "lora_switch_seconds",
    "mode",  # txt2img | img2img | inpaint | outpaint | upscale
    "kept_mean_abs",  # inpaint/outpaint: the kept region's mean absolute difference, 0-255 (NaN: none)
)


def image_from_row(batch: dict, i: int) -> np.ndarray:
    """The [H, W, 3] uint8 image of row i, from the raw bytes the generator put in `pixels`."""
    req = request_at(batch, i)
    return np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(req.height, req.width, 3)


def image_path(image_id: str) -> str:
    """Content-addressed location of an image's master file under the output root."""
    return f"images/{image_id[:2]}/{image_id}.png"


def metadata_for(req: RenderRequest, provenance: Provenance | None = None) -> ImageMetadata:
    """What is embedded in an image's files. No run id: the same image_id gives the same bytes,
    whichever run wrote it (images are stored by id, and a rerun may write one again).
    Usage rights go into `extra` (`rights.*`), which the XMP writer turns into IPTC rights fields.
    An image-conditioned request's input (URIs, sha256s, strength, mask blur) goes into
    `conditioning`: the infotext's `Denoising strength` / `Mask blur` and imagefab's own record."""
    rights = {} if provenance is None or provenance.rights.is_empty() else provenance.rights.to_dict()
    return ImageMetadata(
        image_id=req.image_id,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        sampler=sampler_name(req.scheduler),
        cfg_scale=req.guidance,
        seed=req.seed,
        width=req.width,
        height=req.height,
        model_name=req.base_model["name"],
        model_hash=req.base_model["sha256"],
        loras=req.loras,
        extra={f"rights.{k}": v for k, v in rights.items() if v},
        conditioning={} if req.conditioning is None else asdict(req.conditioning),
    )


def keep_exact(req: RenderRequest, rendered: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """`marked` with the request's exact kept region (app/conditioning/plan.py `exact_region`)
    put back from `rendered`, so the watermark never touches a kept product pixel."""
    from app.conditioning.plan import exact_region, prepare, reload_inputs

    assert req.conditioning is not None
    image, mask = reload_inputs(req.conditioning)
    exact = exact_region(prepare(req.conditioning, image, mask, req.width, req.height))
    return marked if exact is None else np.where(exact[:, :, None], rendered, marked)


def input_ingredients(req: RenderRequest) -> tuple[Ingredient, ...]:
    """The input image (and mask image) of an image-conditioned request, as C2PA ingredients."""
    from app.conditioning.loading import InputLimits, read_bounded

    cond = req.conditioning
    if cond is None:
        return ()
    out = []
    for uri, want in ((cond.image_uri, cond.image_sha256), (cond.mask_uri, cond.mask_sha256)):
        if not uri:
            continue
        data = read_bounded(uri, None, InputLimits().max_bytes)
        if want and hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"input {uri} changed since it was rendered from (sha256 {want[:12]}…)")
        fmt = {b"\x89PNG": "png", b"RIFF": "webp"}.get(data[:4], "jpeg")
        out.append(Ingredient(uri.rsplit("/", 1)[-1], data, fmt, "inputTo"))
    return tuple(out)


def generation_record(req: RenderRequest, provenance: Provenance, watermarked: bool) -> GenerationRecord:
    """What an image's C2PA manifest says about how it was made; an image-conditioned one's input
    (and mask) are its ingredients (`c2pa.created` names them by ingredient id)."""
    base, licences = req.base_model, provenance.licences
    return GenerationRecord(
        image_id=req.image_id,
        generator_version=provenance.generator_version,
        base_model=ModelRecord(base["name"], base["sha256"], base.get("version", ""), licences.get(base["name"], "")),
        loras=tuple(
            ModelRecord(lo.name, lo.sha256, lo.version, licences.get(lo.name, ""), float(lo.weight)) for lo in req.loras
        ),
        rights=provenance.rights,
        inputs=input_ingredients(req),
        watermark_payload=watermark.payload_for(req.image_id) if watermarked else "",
        extra={
            "steps": req.steps,
            "scheduler": req.scheduler,
            "guidance": req.guidance,
            "seed": req.seed,
            "size": f"{req.width}x{req.height}",
        },
    )


class QualityControl:
    """Pixel checks, artefacts, CLIP prompt adherence, near-duplicates and style (app/qc).

    `duplicates` is the run's shared pHash index (a `PhashIndex`, or an adapter to one held by
    a Ray actor so that every QC worker sees every image); None checks duplicates within nothing.
    `clip_on_generator`: the generator measured CLIP (`QcSettings.clip_runs_on_generator`, decided
    where the stages are wired); QC then loads no CLIP and reads `CLIP_COLUMNS` as well. A pending
    row without them, or measured by another model than the settings name, fails.
    """

    # + CLIP_COLUMNS with clip_on_generator; the generator's MEASURE_COLUMNS when present
    reads: tuple[str, ...] = ("status", "request", "pixels", "nonfinite")
    adds = ("status", "reasons", "scores", "phash", "nearest_duplicate", "qc_version", "cpu_seconds")

    def __init__(self, settings: QcSettings, duplicates=None, clip_on_generator: bool = False):
        self.settings = settings
        self.models = QcModels.load(settings, duplicates=duplicates, clip_on_generator=clip_on_generator)
        self.reads = self.reads + (CLIP_COLUMNS if self.models.clip_on_generator else ())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        status, error = list(batch["status"]), list(batch["error"])
        reasons, scores, phash, nearest = ["[]"] * n, ["{}"] * n, [""] * n, [""] * n
        t0 = time.process_time()
        pending = [i for i in range(n) if status[i] == "pending"]
        verdicts = self._judge(batch, pending)
        for i, verdict in zip(pending, verdicts):
            if isinstance(verdict, Exception):  # bad pixels or a bug in one row: that row fails
                status[i], error[i] = "failed", f"qc_error: {type(verdict).__name__}: {verdict}"
                continue
            status[i] = verdict.status
            reasons[i] = json.dumps(list(verdict.reasons))
            scores[i] = json.dumps({k: (None if math.isnan(v) else float(v)) for k, v in verdict.scores.items()})
            phash[i], nearest[i] = verdict.phash or "", verdict.nearest_duplicate or ""
        per_image = (time.process_time() - t0) / max(1, len(pending))
        return {
            **batch,
            "status": object_column(status),
            "error": object_column(error),
            "reasons": object_column(reasons),
            "scores": object_column(scores),
            "phash": object_column(phash),
            "nearest_duplicate": object_column(nearest),
            "qc_version": object_column([self.settings.qc_version] * n),
            "cpu_seconds": np.asarray([per_image if i in pending else 0.0 for i in range(n)], dtype=np.float64),
        }

    def _judge(self, batch: dict, rows: list[int]) -> list:
        """Verdicts for `rows`, batched (CLIP embeds them together); a row that breaks the batch is
        judged alone so only it fails."""
        if not rows:
            return []
        try:
            return self._evaluate(batch, rows)
        except Exception:
            out = []
            for i in rows:
                try:
                    out += self._evaluate(batch, [i])
                except Exception as e:
                    out.append(e)
            return out

    def _evaluate(self, batch: dict, rows: list[int]) -> list:
        reqs = [request_at(batch, i) for i in rows]
        return self.models.evaluate_batch(
            [image_from_row(batch, i) for i in rows],
            [r.prompt for r in reqs],
            image_ids=[str(batch["image_id"][i]) for i in rows],
            combinations=[r.combination for r in reqs],
            tags=[r.tags for r in reqs],
            nonfinite_fractions=[float(batch["nonfinite"][i]) for i in rows],
            clip_measures=[measure_from_row(batch, i) for i in rows] if self.models.clip_on_generator else None,
            conditioning=[
                None if r.conditioning is None else (r.mode, measures_at(batch, i)) for r, i in zip(reqs, rows)
            ],
            # Images that keep the same input's pixels (a product in several scenes) share them by
            # design: their pHashes are close because of the product, not because they repeat.
            siblings=[
                f"input:{r.conditioning.image_sha256}"
                if r.conditioning is not None and r.mode in ("inpaint", "outpaint")
                else None
                for r in reqs
            ],
        )


class Postprocess:
    """Writes the lossless master (always) and the platform variants (for accepted/review).

    With `provenance`, every file carries the invisible watermark (images of at least 256x256
    pixels) and a signed C2PA manifest; a variant's manifest names its master as parent.
    `pixel_sha256` stays the hash of the rendered pixels, before the watermark (what `regenerate`
    renders again).
    """

    reads = ("status", "request", "pixels")
    adds = ("uri", "bytes", "variants", "pixel_sha256", "rights", "cpu_seconds")

    def __init__(self, settings: PostprocessSettings, output: OutputStore, provenance: Provenance | None = None):
        self.settings = settings
        self.output = output
        self.provenance = provenance

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        status, error = list(batch["status"]), list(batch["error"])
        uris, sizes, variants, shas, cpu = [], [], [], [], list(batch["cpu_seconds"])
        rights: list[dict | None] = []
        for i in range(n):
            t0 = time.process_time()
            uri, size, sha = "", 0, ""
            rows: list[dict] = []
            if status[i] not in ("failed", "pending") and len(batch["pixels"][i]):
                try:
                    uri, size, rows, sha = self.write_one(batch, i, with_variants=status[i] != "rejected")
                except StorageError:
                    raise  # a full or read-only output is not this row's fault: every later row would fail too
                except Exception as e:
                    status[i], error[i] = "failed", f"postprocess_error: {type(e).__name__}: {e}"
            uris.append(uri)
            rights.append(self._usage_rights(batch, i) if status[i] != "failed" else None)
            sizes.append(size)
            variants.append(json.dumps(rows))
            shas.append(sha)
            cpu[i] += time.process_time() - t0
        out = {k: v for k, v in batch.items() if k != "pixels"}  # the bytes stop here
        out.update(
            status=object_column(status),
            error=object_column(error),
            uri=object_column(uris),
            bytes=np.asarray(sizes, dtype=np.int64),
            variants=object_column(variants),
            pixel_sha256=object_column(shas),
            rights=object_column(rights),
            cpu_seconds=np.asarray(cpu, dtype=np.float64),
        )
        return out

    def _usage_rights(self, batch: dict, i: int) -> dict | None:
        if self.provenance is None:
            return None
        req = request_at(batch, i)
        return self.provenance.usage_rights(req.base_model["name"], [lo.name for lo in req.loras])

    def write_one(self, batch: dict, i: int, with_variants: bool) -> tuple[str, int, list[dict], str]:
        req = request_at(batch, i)
        rendered = image_from_row(batch, i)
        prov = self.provenance
        # 1. The invisible watermark goes into the pixels every file is made from, except the
        #    kept region of an inpaint or outpaint: the product stays the input's, byte for byte
        marked = prov is not None and prov.watermark and watermark.can_embed(req.width, req.height)
        pixels = watermark.embed(rendered, req.image_id) if marked else rendered
        if marked and req.conditioning is not None and req.conditioning.mode in ("inpaint", "outpaint"):
            pixels = keep_exact(req, rendered, pixels)
        image = Image.fromarray(pixels, "RGB")
        meta = metadata_for(req, prov)
        master = image_path(req.image_id)
        # 2. The master, signed
        data = encode_master(image, meta, self.settings.png_compress_level)
        signer = prov.signer if prov is not None else None
        if signer is not None and prov is not None:
            record = generation_record(req, prov, marked)
            data = sign_master(data, "png", record, signer, master.rsplit("/", 1)[-1])
        uri = self.output.write_bytes(master, data)
        rows: list[dict] = []
        if with_variants:
            # 3. Variants: resized, visibly watermarked when set, invisibly marked again (resizing
            #    moves the mark's blocks), signed with the master as parent ingredient
            def mark(variant: Image.Image) -> Image.Image:
                if not marked or not watermark.can_embed(*variant.size):
                    return variant
                return Image.fromarray(watermark.embed(np.asarray(variant.convert("RGB")), req.image_id), "RGB")

            for v in render_variants(image, self.settings, meta, mark=mark if marked else None):
                ext = "jpg" if v.format == "jpeg" else v.format
                rel = f"{master.removesuffix('.png')}/{v.preset}.{ext}"
                variant_data = v.data
                if signer is not None and prov is not None:
                    variant_data = sign_variant(
                        v.data,
                        v.format,
                        Ingredient(master.rsplit("/", 1)[-1], data, "png"),
                        signer,
                        image_id=req.image_id,
                        generator_version=prov.generator_version,
                        title=rel.rsplit("/", 1)[-1],
                        watermarked=self.settings.watermark is not None,
                        rights=prov.rights,
                        watermark_payload=watermark.payload_for(req.image_id)
                        if marked and watermark.can_embed(v.width, v.height)
                        else "",
                    )
                rows.append(
                    {
                        "preset": v.preset,
                        "uri": self.output.write_bytes(rel, variant_data),
                        "width": v.width,
                        "height": v.height,
                        "format": v.format,
                        "bytes": len(variant_data),
                    }
                )
        return uri, len(data), rows, hashlib.sha256(rendered.data).hexdigest()  # no copy of the buffer


def catalog_row(batch: dict, i: int, *, source: str, prices: PriceTable, created_at: datetime) -> dict:
    """One catalog row from the request and what each stage added."""
    req = request_at(batch, i)
    rights = (batch["rights"][i] or None) if "rights" in batch else None
    scores = json.loads(batch["scores"][i]) if "scores" in batch else {}
    accelerator = str(batch["accelerator"][i]) if "accelerator" in batch else ""
    gpu_s = float(batch["gpu_seconds"][i]) if "gpu_seconds" in batch else 0.0
    cpu_s = float(batch["cpu_seconds"][i]) if "cpu_seconds" in batch else 0.0
    status = str(batch["status"][i])
    backend = json.loads(batch["backend"][i]) if "backend" in batch and batch["backend"][i] else None
    return {
        "image_id": str(batch["image_id"][i]),
        "source": source,
        "created_at": created_at,
        "status": status,
        "reasons": json.loads(batch["reasons"][i]) if "reasons" in batch else [],
        "error": str(batch["error"][i]),
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "template": req.template or None,
        "variables": req.variables,
        "tags": req.tags,
        "row_key": req.row_key,
        "variation": req.variation,
        "row_group": req.row_group or None,
        "base_model": req.base_model,
        "loras": [asdict(lo) for lo in req.loras],
        "scheduler": req.scheduler,
        "steps": req.steps,
        "guidance": req.guidance,
        "width": req.width,
        "height": req.height,
        "seed": req.seed,
        "tier": req.tier,
        "combination": req.combination,
        "lora_fused": req.fuse_loras,
        "batch_id": str(batch["batch_id"][i]) if "batch_id" in batch else "",
        "batch_size": int(batch["batch_size"][i]) if "batch_size" in batch else 0,
        "pixel_sha256": str(batch["pixel_sha256"][i]) if "pixel_sha256" in batch else "",
        "sharpness": scores.get("sharpness"),
        "contrast": scores.get("contrast"),
        "exposure": scores.get("exposure"),
        "clip_score": scores.get("clip_score"),
        "phash": (str(batch["phash"][i]) or None) if "phash" in batch else None,
        "nearest_duplicate": (str(batch["nearest_duplicate"][i]) or None) if "nearest_duplicate" in batch else None,
        "style_distance": scores.get("style_distance"),
        "qc_scores": [(k, v) for k, v in scores.items() if v is not None],
        "qc_version": str(batch["qc_version"][i]) if "qc_version" in batch else None,
        "uri": str(batch["uri"][i]) if "uri" in batch else "",
        "bytes": int(batch["bytes"][i]) if "bytes" in batch and batch["uri"][i] else None,
        "variants": json.loads(batch["variants"][i]) if "variants" in batch else [],
        "gpu_seconds": gpu_s,
        "cpu_seconds": cpu_s,
        "backend": backend,
        "conditioning": conditioning_value(req, batch, i),
        "cost_usd": (prices.image_cost(accelerator, gpu_s, cpu_s) if accelerator else 0.0)
        + (backend["api_cost_usd"] if backend else 0.0),
        "accelerator": accelerator,
        "accelerator_settings": _settings(batch, i),
        "usage_rights": usage_rights_text(rights),
        "rights": rights,
        "approval": "pending",
    }


def conditioning_value(req: RenderRequest, batch: dict, i: int) -> dict | None:
    """Row i's catalog `conditioning` struct: the request's `Conditioning` and the generator's
    `cond_*` measures (NaN, or a batch without the columns, is null). None for txt2img. A failed
    row's request holds what the row named (its input's URI), and no measures."""
    if req.conditioning is None:
        return None
    return {**asdict(req.conditioning), **measures_at(batch, i).__dict__}


def measures_at(batch: dict, i: int) -> Measures:
    """Row i's `Measures` from the generator's `cond_*` columns (a batch without them: none measured)."""
    return measures_from_columns({c: batch[c][i] for c in MEASURE_COLUMNS if c in batch})


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def usage_rights_text(rights: dict | None) -> str:
    """The `usage_rights` column in words: licence, owner, notes and each model's licence."""
    if not rights:
        return ""
    parts = [
        rights.get("licence") or "",
        f"© {rights['owner']}" if rights.get("owner") else "",
        rights.get("notes") or "",
    ]
    models = "; ".join(f"{m['name']}: {m['licence']}" for m in rights.get("model_licences") or [] if m.get("licence"))
    if models:
        parts.append(f"models: {models}")
    return " | ".join(p for p in parts if p)


def _settings(batch: dict, i: int) -> dict | None:
    """Row i's `accelerator_settings` as one struct value; None when the generator recorded none."""
    value = batch["accelerator_settings"][i] if "accelerator_settings" in batch else None
    # A column of nulls (a stand-in generator's) can reach a numpy batch as NaN floats.
    return AcceleratorSettings.from_value(value).to_value() if isinstance(value, dict) else None


class CatalogWrite:
    """Appends one Parquet file per batch; returns the small summary columns to the driver."""

    reads = ("*",)
    adds = SUMMARY_COLUMNS

    def __init__(
        self,
        output: OutputStore,
        run_id: str,
        source: str = "bulk",
        prices: PriceTable | None = None,
        date: str | None = None,
    ):
        self.store = CatalogStore(output)
        self.run_id = run_id
        self.date = date  # the partition; None: the day each batch is written (Serve)
        self.source = source
        self.prices = prices or PriceTable()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        now = datetime.now(UTC)
        n = len(batch["image_id"])
        rows = [catalog_row(batch, i, source=self.source, prices=self.prices, created_at=now) for i in range(n)]
        self.store.append(rows, run_id=self.run_id, date=self.date or now.strftime("%Y-%m-%d"))

        def passed(col, default, dtype):
            return np.asarray(batch[col], dtype=dtype) if col in batch else np.full(n, default, dtype=dtype)

        return {
            "image_id": object_column([r["image_id"] for r in rows]),
            "status": object_column([r["status"] for r in rows]),
            "gpu_seconds": np.asarray([r["gpu_seconds"] for r in rows], dtype=np.float64),
            "cpu_seconds": np.asarray([r["cpu_seconds"] for r in rows], dtype=np.float64),
            "cost_usd": np.asarray([r["cost_usd"] for r in rows], dtype=np.float64),
            "combination": object_column([r["combination"] for r in rows]),
            "base_model": object_column([(r["base_model"] or {}).get("name", "") for r in rows]),
            # Generator counters pass through to the driver's summary (not catalog columns).
            "generator_id": passed("generator_id", "", object),
            "lora_switches": passed("lora_switches", 0, np.int64),
            "lora_switch_seconds": passed("lora_switch_seconds", 0.0, np.float64),
            "mode": object_column([(r["conditioning"] or {}).get("mode") or "txt2img" for r in rows]),
            "kept_mean_abs": np.asarray(
                [_or_nan((r["conditioning"] or {}).get("kept_mean_abs")) for r in rows], dtype=np.float64
            ),
        }


class Finish:
    """QC, post-processing and the catalog append in one CPU stage.

    Run as one Ray stage so a batch's pixels are deserialised once, not once per step; the
    three parts stay separate callables for tests and for the Serve app.
    """

    def __init__(
        self,
        qc: QcSettings,
        postprocess: PostprocessSettings,
        output: OutputStore,
        run_id: str,
        source: str = "bulk",
        prices: PriceTable | None = None,
        duplicates=None,
        date: str | None = None,
        clip_on_generator: bool = False,
        provenance: Provenance | None = None,
    ):
        self.qc = QualityControl(qc, duplicates, clip_on_generator)
        self.post = Postprocess(postprocess, output, provenance)
        self.write = CatalogWrite(output, run_id, source, prices, date)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.write(self.post(self.qc(batch)))
