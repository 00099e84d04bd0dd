"""C2PA Content Credentials: a signed manifest in every master and variant (c2pa-python).

A master's manifest says it was created by a trained algorithm (`c2pa.created`, digital source
type `trainedAlgorithmicMedia`), names the generator (imagefab's version, the base model and the
LoRAs with their sha256), the usage rights, and an input image as an ingredient when one was
used. A variant's manifest opens its master as the parent ingredient (`c2pa.opened`) and records
`c2pa.resized`, `c2pa.edited` for a visible watermark text, and `c2pa.watermarked` for the
invisible watermark (C2PA requires a soft-binding assertion beside it, which names the payload).

Signing is offline (no timestamp authority unless one is configured). The key is a PEM file, or
a callback `sign(data: bytes) -> bytes` so that a KMS or HSM holds it; the certificate chain is
always a PEM file (signing certificate first). Thumbnails are off: they cost ~57 ms and ~130 KB
per 1024² image, and the file is its own preview.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.imagefab.generation"
RIGHTS_LABEL = "org.imagefab.rights"
SOFT_BINDING_ALG = "org.imagefab.dwtDctSvd.1"  # the invisible watermark (watermark.py)
MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
_ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


class SigningError(ValueError):
    """Signing credentials that are missing or unusable, or a file that cannot be signed."""


@dataclass(frozen=True)
class ModelRecord:
    """A model in the manifest: base model or LoRA."""

    name: str
    sha256: str = ""
    version: str = ""
    licence: str = ""
    weight: float | None = None  # LoRAs only

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "sha256": self.sha256}
        if self.licence:
            out["licence"] = self.licence
        if self.weight is not None:
            out["weight"] = self.weight
        return out


@dataclass(frozen=True)
class UsageRights:
    licence: str = ""
    owner: str = ""
    notes: str = ""

    def is_empty(self) -> bool:
        return not (self.licence or self.owner or self.notes)

    def to_dict(self) -> dict[str, str]:
        return {"licence": self.licence, "owner": self.owner, "notes": self.notes}


@dataclass(frozen=True)
class Ingredient:
    """An image the asset was made from, embedded in the manifest by its bytes."""

    title: str
    data: bytes
    format: str  # png | jpeg | webp
    relationship: str = "inputTo"  # parentOf for a variant's master; inputTo for an input image


@dataclass(frozen=True)
class GenerationRecord:
    """What the manifest of one image says about how it was made."""

    image_id: str
    generator_version: str
    base_model: ModelRecord
    loras: tuple[ModelRecord, ...] = ()
    rights: UsageRights = UsageRights()
    inputs: tuple[Ingredient, ...] = ()  # img2img / inpainting inputs
    watermark_payload: str = ""  # the invisible watermark's payload, when one is embedded
    extra: Mapping[str, Any] = field(default_factory=dict)  # steps, seed, …: recorded as given


def master_manifest(record: GenerationRecord, title: str) -> dict[str, Any]:
    """The manifest definition of a generated master (ingredients are added when signing)."""
    created: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": DIGITAL_SOURCE_TYPE,
        "softwareAgent": {"name": "imagefab", "version": record.generator_version},
        "parameters": {"base_model": record.base_model.name},
    }
    if record.inputs:
        created["parameters"]["ingredientIds"] = [f"input-{i}" for i in range(len(record.inputs))]
    actions = [created]
    assertions: list[dict[str, Any]] = []
    if record.watermark_payload:
        actions.append(_watermarked_action())
        assertions.append(_soft_binding(record.watermark_payload))
    generation = {
        "image_id": record.image_id,
        "generator": {"name": "imagefab", "version": record.generator_version},
        "base_model": record.base_model.to_dict(),
        "loras": [lora.to_dict() for lora in record.loras],
        **({"parameters": dict(record.extra)} if record.extra else {}),
    }
    assertions = [
        {"label": "c2pa.actions.v2", "data": {"actions": actions}},
        {"label": GENERATION_LABEL, "data": generation},
        *assertions,
        *_rights_assertions(record.rights),
    ]
    return _manifest(title, assertions)


def variant_manifest(
    image_id: str,
    generator_version: str,
    title: str,
    watermarked: bool,
    rights: UsageRights = UsageRights(),
    watermark_payload: str = "",
) -> dict[str, Any]:
    """The manifest definition of a platform variant of a master (the master is its parent)."""
    actions: list[dict[str, Any]] = [
        {"action": "c2pa.opened", "parameters": {"ingredientIds": ["master"]}},
        {"action": "c2pa.resized"},
    ]
    assertions: list[dict[str, Any]] = []
    if watermarked:
        # A visible text overlay is an edit; `c2pa.watermarked` means a soft-binding watermark.
        actions.append({"action": "c2pa.edited", "parameters": {"description": "visible watermark text"}})
    if watermark_payload:
        actions.append(_watermarked_action())
        assertions.append(_soft_binding(watermark_payload))
    generation = {"image_id": image_id, "generator": {"name": "imagefab", "version": generator_version}}
    return _manifest(
        title,
        [
            {"label": "c2pa.actions.v2", "data": {"actions": actions}},
            {"label": GENERATION_LABEL, "data": generation},
            *assertions,
            *_rights_assertions(rights),
        ],
    )


def _manifest(title: str, assertions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"claim_generator_info": [{"name": "imagefab"}], "title": title, "assertions": assertions}


def _watermarked_action() -> dict[str, Any]:
    return {"action": "c2pa.watermarked", "parameters": {"description": "invisible watermark (DWT-DCT-SVD)"}}


def _soft_binding(payload: str) -> dict[str, Any]:
    # C2PA requires a soft-binding assertion beside `c2pa.watermarked`: it names the watermark
    # and its value, so a reader can find the manifest again from a copy that lost it.
    return {
        "label": "c2pa.soft-binding",
        "data": {"alg": SOFT_BINDING_ALG, "blocks": [{"scope": {}, "value": payload}]},
    }


def _rights_assertions(rights: UsageRights) -> list[dict[str, Any]]:
    if rights.is_empty():
        return []
    work: dict[str, Any] = {"@context": "https://schema.org", "@type": "CreativeWork"}
    if rights.licence:
        work["license"] = rights.licence
    if rights.owner:
        work["copyrightHolder"] = {"@type": "Organization", "name": rights.owner}
    if rights.notes:
        work["usageInfo"] = rights.notes
    return [
        {"label": "stds.schema-org.CreativeWork", "data": work},
        {"label": RIGHTS_LABEL, "data": rights.to_dict()},
    ]


# ---------------------------------------------------------------------------------------------
# Signers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class C2paSigner:
    """How manifests are signed: a certificate chain with a key, or with a signing callback.

    Picklable when built from PEM bytes (it crosses into Ray workers as bytes); a callback is
    named by `module:function` and imported where it signs.
    """

    chain_pem: bytes
    key_pem: bytes | None = None
    callback: str | None = None  # "package.module:function", sign(data: bytes) -> bytes
    algorithm: str = "es256"
    tsa_url: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in _ALGORITHMS:
            raise SigningError(f"C2PA signing algorithm {self.algorithm!r} is not one of {list(_ALGORITHMS)}")
        if (self.key_pem is None) == (self.callback is None):
            raise SigningError("C2PA signing needs exactly one of a private key file and a signing callback")

    def sdk_signer(self):
        import c2pa

        try:
            if self.key_pem is not None:
                info = c2pa.C2paSignerInfo(self.algorithm.encode(), self.chain_pem, self.key_pem, self.tsa_url)
                return c2pa.Signer.from_info(info)
            sign = load_callback(self.callback or "")
            alg = c2pa.C2paSigningAlg[self.algorithm.upper()]
            return c2pa.Signer.from_callback(sign, alg, self.chain_pem.decode(), self.tsa_url)
        except c2pa.C2paError as e:
            raise SigningError(f"the C2PA SDK refused the signing credentials: {e}") from e


def load_callback(reference: str) -> Callable[[bytes], bytes]:
    """`package.module:function` -> the function (a KMS/HSM signing callback)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise SigningError(f"a signing callback is named 'package.module:function', got {reference!r}")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SigningError(f"cannot import the signing callback {reference!r}: {e}") from e
    if not callable(function):
        raise SigningError(f"the signing callback {reference!r} is not callable")
    return function


def load_signer(
    cert: str | Path, key: str | Path | None = None, callback: str | None = None, algorithm: str = "es256"
) -> C2paSigner:
    """A signer from a certificate chain file and a key file (or a callback), checked now.

    Errors name the file and what is wrong with it: missing, not PEM, a CA certificate, a key that
    does not belong to the certificate, no digitalSignature key usage.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    chain_pem = _read_pem(cert, "certificate chain")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise SigningError(f"C2PA certificate chain {cert}: not a PEM certificate ({e})") from e
    leaf = certs[0]
    if len(certs) < 2 and leaf.issuer == leaf.subject:
        raise SigningError(
            f"C2PA certificate chain {cert}: a self-signed certificate cannot sign manifests; "
            "it must be issued by a CA (run `imagefab demo` for a local development CA)"
        )
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            raise SigningError(
                f"C2PA certificate chain {cert}: the first certificate is a CA; put the signing one first"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            raise SigningError(f"C2PA certificate {cert}: key usage lacks digitalSignature")
    except x509.ExtensionNotFound:
        pass
    key_pem = None
    if key is not None:
        key_pem = _read_pem(key, "private key")
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise SigningError(f"C2PA private key {key}: not an unencrypted PEM private key ({e})") from e
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if private.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
            raise SigningError(f"C2PA private key {key} does not belong to the signing certificate in {cert}")
    elif callback is None:
        raise SigningError(f"C2PA signing with {cert} needs a private key file or a signing callback")
    return C2paSigner(chain_pem=chain_pem, key_pem=key_pem, callback=callback, algorithm=algorithm)


def _read_pem(path: str | Path, what: str) -> bytes:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningError(f"C2PA {what} {path}: cannot read ({e.strerror})") from None
    if b"-----BEGIN" not in data:
        raise SigningError(f"C2PA {what} {path}: not a PEM file")
    return data


# ---------------------------------------------------------------------------------------------
# Signing and reading
# ---------------------------------------------------------------------------------------------


def sign_bytes(
    data: bytes,
    fmt: str,
    manifest: Mapping[str, Any],
    signer: C2paSigner,
    ingredients: tuple[Ingredient, ...] = (),
    ingredient_labels: tuple[str, ...] = (),
) -> bytes:
    """`data` (an encoded PNG, JPEG or WebP) with the signed manifest embedded."""
    import c2pa

    mime = _mime(fmt)
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
    try:
        with c2pa.Builder(dict(manifest), context=context) as builder, signer.sdk_signer() as sdk_signer:
            for k, ingredient in enumerate(ingredients):
                definition = {"title": ingredient.title, "relationship": ingredient.relationship}
                if k < len(ingredient_labels):
                    definition["label"] = ingredient_labels[k]
                builder.add_ingredient(definition, _mime(ingredient.format), io.BytesIO(ingredient.data))
            out = io.BytesIO()
            builder.sign(sdk_signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as e:
        raise SigningError(f"C2PA signing of a {fmt} file failed: {e}") from e
    return out.getvalue()


def sign_master(data: bytes, fmt: str, record: GenerationRecord, signer: C2paSigner, title: str) -> bytes:
    labels = tuple(f"input-{i}" for i in range(len(record.inputs)))
    return sign_bytes(data, fmt, master_manifest(record, title), signer, record.inputs, labels)


def sign_variant(
    data: bytes,
    fmt: str,
    master: Ingredient,
    signer: C2paSigner,
    *,
    image_id: str,
    generator_version: str,
    title: str,
    watermarked: bool,
    rights: UsageRights = UsageRights(),
    watermark_payload: str = "",
) -> bytes:
    parent = Ingredient(master.title, master.data, master.format, "parentOf")
    manifest = variant_manifest(image_id, generator_version, title, watermarked, rights, watermark_payload)
    return sign_bytes(data, fmt, manifest, signer, (parent,), ("master",))


def read_manifest(data: bytes, fmt: str | None = None, trust_anchors: bytes | None = None) -> dict[str, Any] | None:
    """The active manifest of `data` and its validation, or None when the file carries none.

    Returns {"valid": no failure codes other than an untrusted signer, "trusted": the signer
    chains to `trust_anchors`, "validation_state", "failures": [codes], "claims": {…}}; claims
    are the actions, the generation record, the rights and the ingredients' titles.
    """
    import c2pa

    mime = _mime(fmt) if fmt else None
    settings: dict[str, Any] = {"verify": {"verify_trust": trust_anchors is not None}}
    if trust_anchors is not None:
        settings["trust"] = {"trust_anchors": trust_anchors.decode()}
    context = c2pa.Context.from_dict(settings)
    try:
        with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
            active = reader.get_active_manifest() or {}
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "no JUMBF" in str(e):
            return None
        return {"valid": False, "trusted": False, "validation_state": "Unreadable", "failures": [str(e)], "claims": {}}
    failures = [item["code"] for item in (results.get("activeManifest") or {}).get("failure", [])]
    hard = [code for code in failures if code != "signingCredential.untrusted"]
    return {
        "valid": not hard,
        "trusted": state == "Trusted",
        "validation_state": state,
        "failures": failures,
        "signer": (active.get("signature_info") or {}).get("common_name"),
        "issuer": (active.get("signature_info") or {}).get("issuer"),
        "claims": _claims(active),
    }


def _claims(active: Mapping[str, Any]) -> dict[str, Any]:
    claims: dict[str, Any] = {"title": active.get("title"), "actions": [], "ingredients": []}
    for assertion in active.get("assertions", []):
        label, data = assertion.get("label", ""), assertion.get("data", {})
        if label.startswith("c2pa.actions"):
            claims["actions"] += [
                {k: action[k] for k in ("action", "digitalSourceType") if k in action}
                for action in data.get("actions", [])
            ]
        elif label == GENERATION_LABEL:
            claims["generation"] = data
        elif label == RIGHTS_LABEL:
            claims["rights"] = data
        elif label == "c2pa.soft-binding":
            claims["soft_binding"] = data
    claims["ingredients"] = [
        {"title": ing.get("title"), "relationship": ing.get("relationship")} for ing in active.get("ingredients", [])
    ]
    return claims


def _mime(fmt: str) -> str:
    try:
        return MIME[fmt.lower()]
    except KeyError:
        raise SigningError(f"C2PA signing covers {sorted(set(MIME))} files, not {fmt!r}") from None
