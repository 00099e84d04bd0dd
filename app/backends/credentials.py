"""API keys: read from the environment or a secret file, named in the spec only by where they are.

`Secret` never prints its value (repr, str, f-strings), and `redact` scrubs a known secret out of
any text (a provider's error body can echo the key back) before it reaches an error, a log or MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path


class CredentialError(ValueError):
    pass


class Secret:
    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str):
        self._value = value
        self.source = source  # "env:NAME" / "file:/path": safe to show

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.source}, ****)"

    __str__ = __repr__

    def __reduce__(self):  # crossing into a Ray actor: send where it is, read it again there
        return (load_secret, (self.source,))


def load_secret(ref: str | None) -> Secret | None:
    """`env:NAME` → the variable's value; `file:/path` → the file's text, stripped. None → None."""
    if ref is None:
        return None
    kind, _, where = ref.partition(":")
    if kind == "env":
        value = os.environ.get(where)
        if not value:
            raise CredentialError(f"credentials: environment variable {where} is not set (credentials: {ref})")
    elif kind == "file":
        path = Path(where).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise CredentialError(f"credentials: cannot read secret file {path}: {e.strerror}") from None
        if not value:
            raise CredentialError(f"credentials: secret file {path} is empty")
    else:
        raise CredentialError(f"credentials must be 'env:NAME' or 'file:/path', not a {kind!r} reference")
    return Secret(value, ref)


def redact(text: str, *secrets: Secret | None) -> str:
    for s in secrets:
        if s is not None and s.reveal():
            text = text.replace(s.reveal(), "****")
    return text
