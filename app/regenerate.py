"""Render a catalogued image again from its catalog row and check it bit for bit.

The row holds every field that decides the pixels (and `image_id` is their hash), the model
versions by sha256, and the batch it was rendered in; an image-conditioned image's `conditioning`
names its input image and mask by URI and sha256, and they are read again: a changed input is
refused, naming the file (reason `input_changed`), before anything renders. The same hardware and
software give the same bytes; anything else is reported with the size of the difference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from app.accelerator import AcceleratorSettings
from app.catalog.store import CatalogStore
from app.models.catalog import ModelCatalog, ResolvedModel
from app.models.digest import ModelFileError
from app.request import LoraRef, RenderRequest
from app.spec import ComputeSpec
from app.storage import OutputStore


class RegenerateError(LookupError):
    """The image cannot be rendered again (unknown id, failed row, models changed)."""


@dataclass
class RegenerateReport:
    image_id: str
    expected_sha256: str
    actual_sha256: str
    max_abs_diff: int  # in 0..255 against the stored master, -1 when it could not be read
    batch_size: int
    accelerator: str
    pixels: np.ndarray

    @property
    def identical(self) -> bool:
        return self.expected_sha256 == self.actual_sha256


def request_from_row(row: dict) -> RenderRequest:
    """The request a catalog row was rendered from: the row has every request field under the
    same name and type (`lora_fused` is the request's `fuse_loras`)."""
    req = RenderRequest.from_arrow_value({**row, "fuse_loras": bool(row["lora_fused"])})
    again = req.pixel_id()
    if again != req.image_id:
        raise RegenerateError(f"catalog row of {req.image_id} does not hash to its id ({again}): the row was altered")
    return req


def check_inputs(request: RenderRequest) -> None:
    """An image-conditioned request's input image and mask, read again: they must still be the
    bytes its image_id was made from (the catalog's `conditioning` names them by URI and sha256)."""
    if request.conditioning is None:
        return
    from app.conditioning.errors import ConditioningError
    from app.conditioning.plan import reload_inputs

    try:
        reload_inputs(request.conditioning)
    except ConditioningError as e:
        raise RegenerateError(f"cannot render {request.image_id} again: {e}") from e


def _same_model(resolved: ResolvedModel, wanted: dict | LoraRef) -> ResolvedModel:
    sha = wanted["sha256"] if isinstance(wanted, dict) else wanted.sha256
    if resolved.sha256 != sha:
        raise RegenerateError(
            f"model '{resolved.name}' has changed since the image was made: the catalog row wants sha256 "
            f"{sha}, {resolved.path} has {resolved.sha256}"
        )
    return resolved


def regenerate(image_id: str, output_uri: str, user_catalog: str | None = None) -> RegenerateReport:
    from app.generator import Generator  # torch: only when rendering

    output = OutputStore.at(output_uri)
    store = CatalogStore(output)
    row = store.find(image_id)
    if row is None:
        raise RegenerateError(f"image {image_id} is not in the catalog at {output.uri}")
    remote = row.get("backend")
    if remote and not remote.get("reproducible", True):
        raise RegenerateError(
            f"image {image_id} is not reproducible: it was rendered by the {remote['name']} backend at "
            f"{remote.get('endpoint_host') or 'its provider'} (model {remote.get('provider_model') or 'unknown'}, "
            f"request {remote.get('request_id') or 'unknown'}, seed {remote.get('seed')}), which does not promise "
            "the same bytes for the same request; there is nothing to compare against"
        )
    if row["status"] == "failed" or not row["pixel_sha256"]:
        raise RegenerateError(f"image {image_id} has no pixels to compare (status {row['status']}: {row['error']})")
    members = [row]
    if (row["batch_size"] or 1) > 1:
        members = store.batch_rows(row["batch_id"])
        if len({m["image_id"] for m in members}) != row["batch_size"]:
            raise RegenerateError(f"batch {row['batch_id']} of {image_id} is incomplete in the catalog")
    requests = [request_from_row(m) for m in {m["image_id"]: m for m in members}.values()]
    for r in requests:
        check_inputs(r)

    catalog = ModelCatalog.load(user_catalog)
    # Models that came through the MLflow registry are named in the run's record.
    try:
        import json

        from app.registry.resolve import ResolvedVersions

        record = json.loads(output.read_bytes(f"runs/{row['run_id']}/run.json"))
        catalog = ResolvedVersions.from_dict(record.get("registry")).merge_into(catalog)
    except OSError:
        pass  # no run record (an image from the Serve app): the catalog names suffice
    try:
        base = _same_model(catalog.resolve_base(row["base_model"]["name"]), row["base_model"])
        loras = {lo.name: _same_model(catalog.resolve_lora(lo.name, base), lo) for r in requests for lo in r.loras}
    except (ModelFileError, KeyError) as e:
        raise RegenerateError(f"cannot load the models of {image_id}: {e}") from e

    settings = AcceleratorSettings.from_catalog(row.get("accelerator_settings"), row["accelerator"])
    compute = recorded_compute(settings, len(requests))
    generator = Generator(base, loras, compute)
    results = {r.image_id: r for r in generator.render_batch_exactly(requests)}
    result = results[image_id]
    if result.error:
        raise RegenerateError(f"rendering {image_id} failed: {result.error}")
    pixels = result.pixels
    if pixels is None:
        raise RegenerateError(f"rendering {image_id} gave no pixels and no error")
    diff = -1
    try:
        from io import BytesIO

        from PIL import Image

        stored = np.asarray(Image.open(BytesIO(output.read_bytes(output.rel_of(row["uri"])))).convert("RGB"))
        if stored.shape == pixels.shape:
            diff = int(np.abs(stored.astype(np.int16) - pixels.astype(np.int16)).max())
    except OSError:
        pass
    return RegenerateReport(
        image_id=image_id,
        expected_sha256=row["pixel_sha256"],
        actual_sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
        max_abs_diff=diff,
        batch_size=len(requests),
        accelerator=generator.accelerator,
        pixels=pixels,
    )


def recorded_compute(settings: AcceleratorSettings | str, n: int) -> ComputeSpec:
    """The generator settings an image was rendered with, from its catalog `accelerator_settings`
    (or, in an older catalog, its `accelerator` text) and the size of its batch: the speed
    settings can change the last bits, so they are applied again."""
    if isinstance(settings, str):
        settings = AcceleratorSettings.from_label(settings)
    return settings.compute_spec(n)
