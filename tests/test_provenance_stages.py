"""Provenance wired into the stages: tiny-model renders signed, watermarked, screened, catalogued."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from app.catalog.store import CatalogStore
from app.expand import ExpandRows, ResolvedModels
from app.provenance.devca import ensure_dev_credentials
from app.provenance.settings import build_provenance
from app.provenance.signing import SigningError
from app.provenance.verify import verify_bytes
from app.spec import ComputeSpec, SpecError, parse_spec
from app.stages import CatalogWrite, Postprocess, QualityControl
from app.storage import OutputStore

RIGHTS = {"licence": "CC-BY-4.0", "owner": "Acme Ltd", "notes": "campaign use only"}


@pytest.fixture(scope="module")
def models(tiny_base, tiny_loras, model_catalog):
    return ResolvedModels.single(tiny_base, loras=dict(tiny_loras), known_loras=tuple(model_catalog.names("lora")))


@pytest.fixture(scope="module")
def generator(models):
    from app.generator import Generator

    return Generator(models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu", cpu_threads=1, batch_size=2))


def spec_for(**over):
    data = {
        "run_name": "t",
        "input": {"path": "/x.parquet"},
        "size": "tiny-square",
        "steps": 3,
        "model": {"base": "tiny-sdxl", "loras": [{"name": "tiny-style", "weight": 0.8}]},
        "variations": {"seeds_per_row": 1, "seed_mode": "fixed", "base_seed": 5},
        "postprocess": {"presets": ["instagram_square"], "format": "jpeg", "watermark": {"text": "demo"}},
        "rights": RIGHTS,
    }
    data.update(over)
    return parse_spec(data)


def expand(models, prompts, **over):
    return ExpandRows(spec_for(**over), models)(pa.Table.from_pylist([{"prompt": p} for p in prompts])).to_pydict()


@pytest.fixture(scope="module")
def written(generator, models, model_catalog, tmp_path_factory):
    """Two renders through QC, post-processing with provenance, and the catalog append."""
    home = tmp_path_factory.mktemp("home")
    spec = spec_for()
    provenance = build_provenance(spec.provenance, spec.rights, model_catalog.licences(), home)
    out = expand(models, ["a red shoe", "a blue hat"])
    batch = generator({k: np.asarray(v, dtype=object) for k, v in out.items()})
    rendered = {str(i): hashlib.sha256(p).hexdigest() for i, p in zip(batch["image_id"], batch["pixels"])}
    output = OutputStore.at(str(home / "out"))
    qc = QualityControl(spec.qc)(batch)
    post = Postprocess(spec.postprocess, output, provenance)(qc)
    CatalogWrite(output, run_id="r1")(post)
    rows = CatalogStore(output).read().to_pylist()
    return {"rows": rows, "output": output, "root": ensure_dev_credentials(home).root_ca.read_bytes(), "qc": qc,
            "rendered": rendered}  # fmt: skip


def test_qc_scores_nsfw(written):
    for scores in written["qc"]["scores"]:
        assert json.loads(scores)["nsfw"] < 0.4  # renders of shoes and hats


def test_catalog_usage_rights_from_spec_and_model_catalog(written):
    for row in written["rows"]:
        rights = row["rights"]
        assert {k: rights[k] for k in RIGHTS} == RIGHTS
        assert all(v in row["usage_rights"] for v in RIGHTS.values() if v)
        assert [m["name"] for m in rights["model_licences"]] == ["tiny-sdxl", "tiny-style"]
        assert all(m["licence"].startswith("imagefab test") for m in rights["model_licences"])


def test_master_and_variant_verify_and_a_resaved_copy_keeps_the_watermark(written):
    output, root = written["output"], written["root"]
    lookup_rows = written["rows"]

    def lookup(payload):
        return [{"image_id": r["image_id"]} for r in lookup_rows if r["image_id"].startswith(payload)]

    for row in written["rows"]:
        master = output.read_bytes(output.rel_of(row["uri"]))
        report = verify_bytes(master, "master.png", trust_anchors=root, lookup=lookup)
        assert report["c2pa"]["valid"] and report["c2pa"]["trusted"], report["c2pa"]
        claims = report["c2pa"]["claims"]
        assert claims["actions"][0]["action"] == "c2pa.created"
        assert claims["generation"]["loras"][0]["name"] == "tiny-style"
        assert claims["rights"]["owner"] == "Acme Ltd"
        assert report["watermark"]["payload"] == row["image_id"][:12]
        assert report["watermark"]["catalog"] == [{"image_id": row["image_id"]}]
        assert row["image_id"] in report["infotext"]
        assert b"xmpRights:UsageTerms" in master and b"CC-BY-4.0; campaign use only" in master
        # pixel_sha256 is what the generator rendered (what regenerate checks), before the watermark
        assert row["pixel_sha256"] == written["rendered"][row["image_id"]]
        if row["status"] == "rejected":
            continue
        (variant,) = row["variants"]
        data = output.read_bytes(output.rel_of(variant["uri"]))
        report = verify_bytes(data, "v.jpg", trust_anchors=root, lookup=lookup)
        assert report["c2pa"]["valid"], report["c2pa"]
        actions = [a["action"] for a in report["c2pa"]["claims"]["actions"]]
        assert actions == ["c2pa.opened", "c2pa.resized", "c2pa.edited", "c2pa.watermarked"]
        assert report["c2pa"]["claims"]["ingredients"][0]["relationship"] == "parentOf"
        assert report["watermark"]["payload"] == row["image_id"][:12]
        resaved = io.BytesIO()
        Image.open(io.BytesIO(data)).save(resaved, "JPEG", quality=70)
        copy = verify_bytes(resaved.getvalue(), "copy.jpg", lookup=lookup)
        assert copy["c2pa"] is None and copy["watermark"]["payload"] == row["image_id"][:12]


def test_cli_verify_json(written, capsys, monkeypatch):
    from app.cli import main

    output = written["output"]
    row = written["rows"][0]
    master = output.rel_of(row["uri"])
    files = [f"{output.uri}/{master}"]
    assert main(["verify", "--json", "--output", output.uri, *files]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    report = json.loads(line)
    assert set(report) == {"file", "c2pa", "watermark", "infotext"}
    assert report["watermark"]["payload"] == row["image_id"][:12] and report["c2pa"]["valid"]


def test_blocked_prompts_become_failed_rows_before_rendering(models):
    out = expand(models, ["a ＮＵＤＥ statue in a museum", "Scunthorpe United away kit", "Explicit   sex scene"])
    assert out["status"] == ["failed", "pending", "failed"]
    assert out["error"][0] == "prompt_blocked: nude" and out["error"][2] == "prompt_blocked: explicit sex"
    custom = expand(models, ["a red chair"], screening={"prompt_terms": ["chair"]})
    assert custom["error"] == ["prompt_blocked: chair"]
    off = expand(models, ["a nude statue"], screening={"prompts": False})
    assert off["status"] == ["pending"]


def test_signing_settings_errors_name_the_problem(tmp_path, model_catalog):
    with pytest.raises(SpecError, match="needs a `key` file or a signing `callback`"):
        spec_for(provenance={"signing": {"cert": "chain.pem"}})
    spec = spec_for(provenance={"signing": {"cert": str(tmp_path / "chain.pem"), "key": str(tmp_path / "k.pem")}})
    with pytest.raises(SigningError, match="chain.pem: cannot read"):
        build_provenance(spec.provenance, spec.rights, {}, tmp_path)
    off = spec_for(provenance={"c2pa": False, "watermark": False})
    assert build_provenance(off.provenance, off.rights, {}, tmp_path).signer is None
    assert not (tmp_path / "c2pa").exists()  # nothing created when signing is off


def test_an_outpainted_packshot_keeps_its_pixels_under_the_watermark_and_names_its_input(
    generator, models, model_catalog, tmp_path
):
    """The invisible watermark marks the generated pixels only; the product stays the input's,
    and the C2PA manifest carries the input file as an ingredient."""
    from pathlib import Path

    from app.conditioning.plan import exact_region, load_inputs, prepare
    from app.provenance import watermark

    specs = Path(__file__).resolve().parents[1] / "specs"
    spec = spec_for(image={"mode": "outpaint", "targets": ["256x448"], "base_dir": str(specs)}, rights=None)
    provenance = build_provenance(spec.provenance, spec.rights, model_catalog.licences(), tmp_path / "home")
    rows = pa.Table.from_pylist([{"prompt": "a gold coin on a marble table", "image": "data/packshots/coin.png"}])
    out = ExpandRows(spec, models)(rows).to_pydict()
    batch = generator({k: np.asarray(v, dtype=object) for k, v in out.items()})
    post = Postprocess(spec.postprocess, OutputStore.at(str(tmp_path / "out")), provenance)(
        QualityControl(spec.qc)(batch)
    )
    data = (tmp_path / "out" / post["uri"][0].split("/out/", 1)[1]).read_bytes()
    saved = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    [req] = [r for r in ExpandRows(spec, models)(rows)["request"].to_pylist()]
    image, _ = load_inputs(str(specs / "data/packshots/coin.png"))
    from app.request import RenderRequest

    request = RenderRequest.from_arrow_value(req)
    exact = exact_region(prepare(request.conditioning, image, None, request.width, request.height))
    rendered = np.frombuffer(batch["pixels"][0], dtype=np.uint8).reshape(saved.shape)
    assert np.array_equal(saved[exact], rendered[exact])  # the product's pixels: untouched by the mark
    assert not np.array_equal(saved, rendered)  # the rest is marked
    assert watermark.detect(saved).payload == watermark.payload_for(request.image_id)
    manifest = verify_bytes(
        data, "master.png", trust_anchors=ensure_dev_credentials(tmp_path / "home").root_ca.read_bytes()
    )
    assert manifest["c2pa"]["valid"]
    assert manifest["c2pa"]["claims"]["ingredients"] == [{"title": "coin.png", "relationship": "inputTo"}]
