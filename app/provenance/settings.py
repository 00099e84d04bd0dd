"""Spec settings for provenance, usage rights and prompt screening, and what a stage carries.

provenance:
  c2pa: true          # sign a C2PA manifest into every master and variant
  watermark: true     # embed the invisible watermark (image id prefix) in every output
  signing:            # unset: the local development CA under $IMAGEFAB_HOME/c2pa (not for publishing)
    cert: certs/chain.pem        # signing certificate first, then its CA(s)
    key: certs/signing-key.pem   # or `callback: mypackage.kms:sign` (a KMS or HSM signs)
rights: {licence: "CC-BY-4.0", owner: "Acme Ltd", notes: "campaign use only"}
screening:
  prompts: true
  prompt_terms: [...]   # replaces the default list
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.provenance.devca import NOT_FOR_PUBLISHING, ensure_dev_credentials
from app.provenance.screening import DEFAULT_PROMPT_TERMS, PromptScreen
from app.provenance.signing import C2paSigner, SigningError, UsageRights, load_signer


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SigningSettings(_Frozen):
    cert: str | None = None  # PEM chain, signing certificate first
    key: str | None = None  # PEM private key (unencrypted); or `callback`
    callback: str | None = None  # "package.module:function": sign(data: bytes) -> bytes
    algorithm: str = "es256"

    @model_validator(mode="after")
    def _complete(self) -> SigningSettings:
        if self.cert is None and (self.key or self.callback):
            raise ValueError("`key` or `callback` needs `cert` (the signing certificate chain)")
        if self.cert is not None and not (self.key or self.callback):
            raise ValueError(f"`cert` {self.cert!r} needs a `key` file or a signing `callback`")
        if self.key and self.callback:
            raise ValueError("give a `key` file or a signing `callback`, not both")
        return self

    @property
    def uses_dev_ca(self) -> bool:
        return self.cert is None


class ProvenanceSettings(_Frozen):
    c2pa: bool = True
    watermark: bool = True
    signing: SigningSettings = SigningSettings()


class RightsSpec(_Frozen):
    licence: str = Field("", max_length=500)
    owner: str = Field("", max_length=500)
    notes: str = Field("", max_length=2000)

    def usage_rights(self) -> UsageRights:
        return UsageRights(self.licence, self.owner, self.notes)


class ScreeningSettings(_Frozen):
    prompts: bool = True
    prompt_terms: tuple[str, ...] = DEFAULT_PROMPT_TERMS

    @model_validator(mode="after")
    def _terms_compile(self) -> ScreeningSettings:
        PromptScreen(self.prompt_terms)  # raises on an empty term
        return self

    def prompt_screen(self) -> PromptScreen | None:
        return PromptScreen(self.prompt_terms) if self.prompts else None


@dataclass(frozen=True)
class Provenance:
    """What post-processing and the catalog need, built on the driver and picklable.

    `signer` is None with `c2pa: false`; `licences` maps model names to the licence the model
    catalog gives them.
    """

    signer: C2paSigner | None
    watermark: bool
    rights: UsageRights = field(default_factory=UsageRights)
    licences: Mapping[str, str] = field(default_factory=dict)
    generator_version: str = ""
    dev_ca: bool = False

    def usage_rights(self, base_model: str, loras: list[str]) -> dict:
        """The catalog's `usage_rights` value for an image made with these models."""
        models = [base_model, *loras]
        return {
            **self.rights.to_dict(),
            "model_licences": [{"name": name, "licence": self.licences.get(name, "")} for name in models],
        }


def generator_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagefab")
    except PackageNotFoundError:
        return "0+unknown"


def build_provenance(
    settings: ProvenanceSettings,
    rights: RightsSpec | None,
    licences: Mapping[str, str],
    home: str | Path,
    report=None,
) -> Provenance:
    """Load and check the signing credentials now (on the driver): a missing or unusable key or
    certificate fails the run before any rendering, naming the file. Without configured
    credentials the development CA under `home` is used (created once) and `report` is told so."""
    signer = None
    dev = False
    if settings.c2pa:
        signing = settings.signing
        if signing.uses_dev_ca:
            creds = ensure_dev_credentials(home)
            signer = load_signer(creds.chain, creds.key)
            dev = True
            if report is not None:
                report(f"C2PA: signing with the development certificate {creds.chain}. {NOT_FOR_PUBLISHING}")
        else:
            if signing.cert is None:  # the validator guarantees it; says so to the type checker
                raise SigningError("provenance.signing.cert is not set")
            signer = load_signer(signing.cert, signing.key, signing.callback, signing.algorithm)
            if signing.callback:
                signer.sdk_signer()  # imports the callback now: a typo fails here, not in a worker
    return Provenance(
        signer=signer,
        watermark=settings.watermark,
        rights=(rights or RightsSpec()).usage_rights(),
        licences=dict(licences),
        generator_version=generator_version(),
        dev_ca=dev,
    )
