"""Provenance and safety on the real parts: the C2PA SDK, the watermark, NudeNet's model."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app.metadata import ImageMetadata
from app.postprocess import encode_image
from app.provenance import watermark
from app.provenance.devca import NOT_FOR_PUBLISHING, ensure_dev_credentials, issue_dev_certificates
from app.provenance.screening import NsfwClassifier, PromptScreen, normalise
from app.provenance.signing import (
    DIGITAL_SOURCE_TYPE,
    GenerationRecord,
    Ingredient,
    ModelRecord,
    SigningError,
    UsageRights,
    load_signer,
    read_manifest,
    sign_master,
    sign_variant,
)
from app.provenance.verify import verify_bytes
from tests.photos import photo

IMAGE_ID = hashlib.sha256(b"an image").hexdigest()
BASE_SHA = hashlib.sha256(b"base").hexdigest()
LORA_SHA = hashlib.sha256(b"lora").hexdigest()
RIGHTS = UsageRights(licence="CC-BY-4.0", owner="Acme Ltd", notes="campaign use only")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return ensure_dev_credentials(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def signer(dev):
    return load_signer(dev.chain, dev.key)


def record(**changes) -> GenerationRecord:
    fields = dict(
        image_id=IMAGE_ID,
        generator_version="0.1.0",
        base_model=ModelRecord("sdxl-base", BASE_SHA, "1", "CreativeML Open RAIL++-M"),
        loras=(ModelRecord("watercolor", LORA_SHA, "2", "CC-BY-4.0", weight=0.8),),
        rights=RIGHTS,
        watermark_payload=IMAGE_ID[:12],
    )
    return GenerationRecord(**{**fields, **changes})


def png(pixels: np.ndarray) -> bytes:
    meta = ImageMetadata(
        IMAGE_ID, "a red chair", "", 4, "Euler", 5.0, 1, pixels.shape[1], pixels.shape[0], "sdxl-base", BASE_SHA
    )
    return encode_image(Image.fromarray(pixels), "png", meta)


# --- development CA -------------------------------------------------------------------------


def test_dev_credentials_are_made_once_and_kept(tmp_path):
    first = ensure_dev_credentials(tmp_path)
    assert first.created and first.key.stat().st_mode & 0o077 == 0
    before = first.chain.read_bytes()
    second = ensure_dev_credentials(tmp_path)
    assert not second.created and second.chain.read_bytes() == before
    assert "not trusted for publishing" in (tmp_path / "c2pa" / "README.txt").read_text()
    assert "not trusted for publishing" in NOT_FOR_PUBLISHING


# --- signing and reading back -----------------------------------------------------------------


def test_signed_master_reads_back_valid_with_its_claims(dev, signer):
    data = png(photo("astronaut", 256))
    signed = sign_master(data, "png", record(), signer, f"{IMAGE_ID}.png")
    manifest = read_manifest(signed, "png", trust_anchors=dev.root_ca.read_bytes())
    assert manifest is not None and manifest["valid"] and manifest["trusted"], manifest
    claims = manifest["claims"]
    created = claims["actions"][0]
    assert created == {"action": "c2pa.created", "digitalSourceType": DIGITAL_SOURCE_TYPE}
    assert [a["action"] for a in claims["actions"]] == ["c2pa.created", "c2pa.watermarked"]
    generation = claims["generation"]
    assert generation["image_id"] == IMAGE_ID and generation["generator"] == {"name": "imagefab", "version": "0.1.0"}
    assert generation["base_model"]["sha256"] == BASE_SHA
    assert generation["base_model"]["licence"] == "CreativeML Open RAIL++-M"
    assert generation["loras"] == [
        {"name": "watercolor", "version": "2", "sha256": LORA_SHA, "licence": "CC-BY-4.0", "weight": 0.8}
    ]
    assert claims["rights"] == RIGHTS.to_dict()
    assert claims["soft_binding"]["blocks"][0]["value"] == IMAGE_ID[:12]
    # Without the trust anchor the signature is still valid; the signer is just unknown.
    untrusted = read_manifest(signed, "png")
    assert untrusted["valid"] and not untrusted["trusted"]


def test_one_changed_byte_breaks_the_hash_binding(dev, signer):
    data = png(photo("coffee", 256))
    signed = bytearray(sign_master(data, "png", record(), signer, "x.png"))
    # A byte inside the pixel data (IDAT), which the manifest's hash covers.
    idat = signed.index(b"IDAT")
    signed[idat + 100] ^= 0x01
    manifest = read_manifest(bytes(signed), "png", trust_anchors=dev.root_ca.read_bytes())
    assert manifest is not None and not manifest["valid"]
    assert "assertion.dataHash.mismatch" in manifest["failures"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_variant_names_its_master_as_parent(dev, signer, fmt):
    master = sign_master(png(photo("chelsea", 256)), "png", record(inputs=()), signer, "master.png")
    small = encode_image(Image.fromarray(photo("chelsea", 128)), fmt)
    signed = sign_variant(
        small, fmt, Ingredient("master.png", master, "png"), signer,
        image_id=IMAGE_ID, generator_version="0.1.0", title=f"thumb.{fmt}", watermarked=True, rights=RIGHTS,
        watermark_payload=IMAGE_ID[:12],
    )  # fmt: skip
    manifest = read_manifest(signed, fmt, trust_anchors=dev.root_ca.read_bytes())
    assert manifest["valid"] and manifest["trusted"], manifest
    assert [a["action"] for a in manifest["claims"]["actions"]] == [
        "c2pa.opened",
        "c2pa.resized",
        "c2pa.edited",
        "c2pa.watermarked",
    ]
    assert manifest["claims"]["ingredients"] == [{"title": "master.png", "relationship": "parentOf"}]


def test_input_image_is_an_ingredient(dev, signer):
    source = encode_image(Image.fromarray(photo("rocket", 256)), "jpeg")
    rec = record(inputs=(Ingredient("product.jpg", source, "jpeg", "inputTo"),))
    signed = sign_master(png(photo("rocket", 256)), "png", rec, signer, "out.png")
    manifest = read_manifest(signed, "png", trust_anchors=dev.root_ca.read_bytes())
    assert manifest["valid"]
    assert manifest["claims"]["ingredients"] == [{"title": "product.jpg", "relationship": "inputTo"}]


def sign_with_test_key(data: bytes) -> bytes:
    """A signing callback, as a KMS client would be: the key never reaches imagefab."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with open(os.environ["IMAGEFAB_TEST_C2PA_KEY"], "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def test_callback_signer(dev, monkeypatch):
    monkeypatch.setenv("IMAGEFAB_TEST_C2PA_KEY", str(dev.key))
    signer = load_signer(dev.chain, callback="tests.test_provenance:sign_with_test_key")
    signed = sign_master(png(photo("coffee", 256)), "png", record(), signer, "x.png")
    manifest = read_manifest(signed, "png", trust_anchors=dev.root_ca.read_bytes())
    assert manifest["valid"] and manifest["trusted"]


def test_bad_credentials_are_named(tmp_path, dev):
    with pytest.raises(SigningError, match="cannot read"):
        load_signer(tmp_path / "missing.pem", dev.key)
    (tmp_path / "text.pem").write_text("hello")
    with pytest.raises(SigningError, match="not a PEM"):
        load_signer(tmp_path / "text.pem", dev.key)
    other_root, _other_chain, other_key = issue_dev_certificates()
    (tmp_path / "other-key.pem").write_bytes(other_key)
    with pytest.raises(SigningError, match="does not belong"):
        load_signer(dev.chain, tmp_path / "other-key.pem")
    (tmp_path / "root.pem").write_bytes(other_root)
    with pytest.raises(SigningError, match="self-signed|is a CA"):
        load_signer(tmp_path / "root.pem", tmp_path / "other-key.pem")
    with pytest.raises(SigningError, match="private key file or a signing callback"):
        load_signer(dev.chain)
    with pytest.raises(SigningError, match="cannot import"):
        load_signer(dev.chain, callback="tests.no_such_module:sign").sdk_signer()


def test_unsigned_file_has_no_manifest():
    assert read_manifest(png(photo("coffee", 256)), "png") is None


# --- watermark --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "side"), [("astronaut", 512), ("coffee", 512), ("astronaut", 256)])
def test_watermark_survives_jpeg_and_half_size(name, side):
    pixels = photo(name, side)
    marked = watermark.embed(np.array(pixels), IMAGE_ID)
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - pixels) ** 2))
    assert psnr > 38
    assert watermark.detect(marked).payload == IMAGE_ID[:12]
    buffer = io.BytesIO()
    Image.fromarray(marked).save(buffer, "JPEG", quality=70)
    assert watermark.detect(np.asarray(Image.open(buffer).convert("RGB"))).payload == IMAGE_ID[:12]
    half = Image.fromarray(marked).resize((marked.shape[1] // 2, marked.shape[0] // 2), Image.Resampling.LANCZOS)
    reading = watermark.detect(np.asarray(half))  # read at twice its size (below 256² it is upscaled first)
    assert reading is not None and reading.payload == IMAGE_ID[:12]


def test_unmarked_photos_show_no_watermark():
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        assert watermark.detect(np.array(photo(name, 512))) is None, name


def test_library_decoder_reads_our_marks():
    from imwatermark import WatermarkDecoder

    marked = watermark.embed(np.array(photo("chelsea", 512)), IMAGE_ID)
    bits = WatermarkDecoder("bits", watermark.TOTAL_BITS).decode(
        np.ascontiguousarray(marked[:, :, ::-1]), "dwtDctSvd", scales=list(watermark.SCALES)
    )
    assert [int(b) for b in bits] == watermark.payload_bits(IMAGE_ID[:12])


def test_watermark_refuses_small_images_and_bad_ids():
    with pytest.raises(watermark.WatermarkError, match="too small"):
        watermark.embed(np.zeros((128, 128, 3), np.uint8), IMAGE_ID)
    with pytest.raises(watermark.WatermarkError, match="hex"):
        watermark.payload_for("not-hex-at-all")
    assert watermark.detect(np.zeros((128, 128, 3), np.uint8)) is None


# --- screening --------------------------------------------------------------------------------


def test_prompt_screen_matches_whole_normalised_words():
    screen = PromptScreen(("nude", "explicit sex", "cunt"))
    assert screen.reason("Scunthorpe United away kit, studio shot") is None
    assert screen.reason("a NUDE figure") == "prompt_blocked: nude"
    assert screen.reason("a ｎｕｄｅ figure") == "prompt_blocked: nude"  # full-width letters
    assert screen.reason("explicit\n  SEX, and nude") == "prompt_blocked: explicit sex, nude"
    assert screen.reason("nudenet is a library") is None
    assert normalise("Straße") == "strasse"
    with pytest.raises(ValueError, match="visible"):
        PromptScreen(("ok", "  "))


@pytest.fixture(scope="module")
def nsfw():
    return NsfwClassifier()


def test_nsfw_scores_ordinary_photographs_low(nsfw):
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        result = nsfw.score(np.array(photo(name, 512)))
        assert 0.0 <= result.score < 0.5, (name, result)
    with pytest.raises(ValueError, match="RGB"):
        nsfw.score(np.zeros((8, 8), np.uint8))


# --- verify -----------------------------------------------------------------------------------


def test_verify_master_and_a_resaved_copy(dev, signer):
    pixels = watermark.embed(np.array(photo("astronaut", 512)), IMAGE_ID)
    signed = sign_master(png(pixels), "png", record(), signer, "m.png")
    rows = {IMAGE_ID[:12]: [{"image_id": IMAGE_ID, "status": "accepted"}]}
    report = verify_bytes(signed, "m.png", trust_anchors=dev.root_ca.read_bytes(), lookup=lambda p: rows.get(p, []))
    assert report["c2pa"]["valid"] and report["c2pa"]["trusted"]
    assert report["watermark"]["payload"] == IMAGE_ID[:12]
    assert report["watermark"]["catalog"] == rows[IMAGE_ID[:12]]
    assert "a red chair" in report["infotext"]

    resaved = io.BytesIO()
    Image.open(io.BytesIO(signed)).convert("RGB").save(resaved, "JPEG", quality=70)  # a re-save drops metadata
    copy = verify_bytes(resaved.getvalue(), "copy.jpg", lookup=lambda p: rows.get(p, []))
    assert copy["c2pa"] is None and copy["infotext"] is None
    assert copy["watermark"]["payload"] == IMAGE_ID[:12]
    assert any("no manifest" in line for line in copy["summary"])


def test_package_imports_without_ray_or_c2pa():
    code = "import sys, app.provenance.signing, app.provenance.watermark, app.provenance.screening, app.provenance.verify; print(sorted(m for m in ('ray', 'c2pa', 'cv2', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
