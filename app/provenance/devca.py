"""A local development CA and C2PA signing certificate, created once, for offline demos and tests.

C2PA readers refuse a self-signed leaf: the signing certificate must be issued by a separate CA,
with basicConstraints CA=false, keyUsage digitalSignature (critical), extendedKeyUsage
emailProtection, and subject/authority key identifiers. ES256 (P-256) keys.

Files under `<home>/c2pa/`: `dev-root-ca.pem` (the CA certificate, a trust anchor for
verifying), `dev-signing-chain.pem` (signing certificate followed by the CA) and
`dev-signing-key.pem`. The CA's key is thrown away once the signing certificate exists: nothing
else can be issued from it. No C2PA trust list includes this CA, so a platform shows these
manifests as signed by an unknown signer: they are for development, never for publishing.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOT_FOR_PUBLISHING = (
    "imagefab development C2PA certificate: signed by a local CA that no C2PA trust list contains. "
    "Manifests verify against it offline, but platforms will show them as from an untrusted signer; "
    "not trusted for publishing (configure provenance.signing with a certificate from a C2PA-listed CA)."
)
_ORGANISATION = "imagefab development (not trusted for publishing)"
_VALID_DAYS = 3650


@dataclass(frozen=True)
class DevCredentials:
    """Paths of the development CA certificate, signing chain and signing key."""

    root_ca: Path
    chain: Path
    key: Path
    created: bool  # False: they were there already


def dev_credentials_dir(home: str | Path) -> Path:
    return Path(home) / "c2pa"


def ensure_dev_credentials(home: str | Path) -> DevCredentials:
    """The development CA and signing certificate under `<home>/c2pa/`, created when missing.

    Idempotent: existing files are kept (a new CA would make earlier manifests unverifiable
    against the stored trust anchor).
    """
    folder = dev_credentials_dir(home)
    creds = DevCredentials(
        folder / "dev-root-ca.pem", folder / "dev-signing-chain.pem", folder / "dev-signing-key.pem", False
    )
    if creds.root_ca.is_file() and creds.chain.is_file() and creds.key.is_file():
        return creds
    folder.mkdir(parents=True, exist_ok=True)
    root_pem, chain_pem, key_pem = issue_dev_certificates()
    _write_atomic(creds.key, key_pem, mode=0o600)
    _write_atomic(creds.chain, chain_pem)
    _write_atomic(creds.root_ca, root_pem)  # last: its presence says the set is complete
    (folder / "README.txt").write_text(NOT_FOR_PUBLISHING + "\n")
    return DevCredentials(creds.root_ca, creds.chain, creds.key, True)


def issue_dev_certificates(now: dt.datetime | None = None) -> tuple[bytes, bytes, bytes]:
    """(root CA PEM, signing chain PEM = leaf + root, signing key PEM), freshly generated."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=_VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "imagefab development root CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, "imagefab development signer"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # C2PA's allowed EKUs; this SDK version refused documentSigning, accepts emailProtection.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    root_pem = ca_cert.public_bytes(pem)
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return root_pem, leaf.public_bytes(pem) + root_pem, key_pem


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
