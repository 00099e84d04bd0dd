"""Registry references and the two template syntaxes.

References (what a spec may hold where it would hold a concrete value):

    models:/NAME@ALIAS   models:/NAME/VERSION   models:/NAME/latest    base model or LoRA
    prompts:/NAME@ALIAS  prompts:/NAME/VERSION                          prompt template
    qc:/NAME@ALIAS       qc:/NAME/VERSION                               QC settings (model `qc-NAME`)

Templates: imagefab's are Python format strings (`{column}`, a literal brace doubled: `{{`);
MLflow's prompt registry uses `{{variable}}` with single braces literal. `to_mlflow_template` and
`from_mlflow_template` convert between them; a template that would not survive the round trip
(literal text that itself reads as `{{name}}` in MLflow) is refused rather than changed.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

SCHEMES = ("models", "prompts", "qc")
QC_PREFIX = "qc-"  # QC settings `qc:/default` live in the registered model `qc-default`
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REF = re.compile(r"^(?P<scheme>models|prompts|qc):/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))?$")
# MLflow's variables, loosely: anything but braces between `{{` and `}}`, spaces around trimmed.
_MLFLOW_VAR = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


@dataclass(frozen=True)
class Reference:
    scheme: str  # models | prompts | qc
    name: str  # as written after the scheme (`default` in qc:/default@production)
    alias: str | None = None
    version: str | None = None  # a number or "latest"

    @property
    def registered_name(self) -> str:
        """The MLflow name: QC settings are registered models named `qc-<name>`."""
        return QC_PREFIX + self.name if self.scheme == "qc" else self.name

    @property
    def kind(self) -> str:
        return {"models": "model", "prompts": "prompt", "qc": "qc"}[self.scheme]

    def __str__(self) -> str:
        tail = f"@{self.alias}" if self.alias else f"/{self.version}"
        return f"{self.scheme}:/{self.name}{tail}"


def is_reference(value: object) -> bool:
    return isinstance(value, str) and value.startswith(tuple(f"{s}:/" for s in SCHEMES))


def parse_reference(text: str) -> Reference:
    """`models:/brand-style@production` -> Reference; raises ValueError saying what is valid."""
    m = _REF.match(text.strip())
    if not m:
        raise ValueError(
            f"{text!r} is not a registry reference; expected models:/NAME@ALIAS, models:/NAME/VERSION, "
            f"prompts:/NAME@ALIAS, prompts:/NAME/VERSION, qc:/NAME@ALIAS or qc:/NAME/VERSION"
        )
    ref = Reference(m["scheme"], m["name"], m["alias"], m["version"])
    if not NAME.match(ref.name):
        raise ValueError(f"{text!r}: '{ref.name}' is not a registry name (letters, digits, '_', '.', '-')")
    if ref.alias is None and ref.version is None:
        raise ValueError(f"{text!r} names no version: add @ALIAS (e.g. @production) or /VERSION (e.g. /3)")
    if ref.version is not None and not (ref.version.isdigit() or ref.version == "latest"):
        raise ValueError(f"{text!r}: version '{ref.version}' is neither a number nor 'latest'")
    return ref


def to_mlflow_template(template: str) -> str:
    """imagefab `{column}` -> MLflow `{{column}}`; `{{` (a literal brace) -> `{`."""
    parts = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            if spec or conv or not name:
                raise ValueError(f"template placeholder in {template!r} must be a plain {{column}}")
            parts.append("{{" + name + "}}")
    converted = "".join(parts)
    back = from_mlflow_template(converted)
    if back != template:
        raise ValueError(
            f"template {template!r} cannot be stored in MLflow's prompt registry unchanged: it would come "
            f"back as {back!r} (literal braces that read as {{{{variables}}}}, or spaces around a name)"
        )
    return converted


def from_mlflow_template(template: str) -> str:
    """MLflow `{{ variable }}` -> imagefab `{variable}`; other braces are doubled (literal)."""
    out, pos = [], 0
    for m in _MLFLOW_VAR.finditer(template):
        out.append(_escape(template[pos : m.start()]))
        out.append("{" + m[1] + "}")
        pos = m.end()
    out.append(_escape(template[pos:]))
    return "".join(out)


def mlflow_variables(template: str) -> list[str]:
    return [m[1] for m in _MLFLOW_VAR.finditer(template)]


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")
