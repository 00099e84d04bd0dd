"""Hostile JSON values, as Hypothesis strategies and as a fixed table, and the bodies that carry them.

Each is legal to Python's `json` (which writes `NaN` and `Infinity` by default and reads them back,
reads `1e400` as infinity, integers of any length, `"\\ud800"` as a lone surrogate and `"\\u0000"`
as NUL) and refused by the Serve app. `Raw` is JSON text put into a body as it is: literals no
Python value dumps to (`1e400`), and nesting too deep for `json.dumps` to write.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from app.serve.app import OPENAI_ROUTES
from app.serve.bodies import MAX_DEPTH


@dataclass(frozen=True)
class Raw:
    text: str


def nested(depth: int, inner: str = "0") -> Raw:
    """Arrays and objects nested `depth` deep, alternately."""
    opening = "".join("[" if i % 2 == 0 else '{"k":' for i in range(depth))
    closing = "".join("]" if i % 2 == 0 else "}" for i in reversed(range(depth)))
    return Raw(opening + inner + closing)


def encode(body: Any) -> bytes:
    """`body` as JSON text, each `Raw` written as its text and strings escaped as `json.dumps`
    escapes them (`"\\ud800"`, `"\\u0000"`)."""
    raws: list[str] = []

    def placeholder(value: Any) -> str:
        if not isinstance(value, Raw):
            raise TypeError(f"cannot encode {value!r}")
        raws.append(value.text)
        return f"@@raw{len(raws) - 1}@@"

    text = json.dumps(body, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw)
    return text.encode()


def with_value(body: dict, path: str, value: Any) -> dict:
    """A copy of `body` with `value` at the dotted `path` (`loras.0.weight`: a number is a list
    index), making the objects and lists on the way."""
    out = copy.deepcopy(body)
    node: Any = out
    parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part, after in zip(parts, [*parts[1:], None], strict=True):
        if isinstance(node, list):
            node.extend([None] * (part + 1 - len(node)))
        if after is None:
            node[part] = value
            break
        kind = list if isinstance(after, int) else dict
        current = node[part] if isinstance(node, list) else node.get(part)
        if not isinstance(current, kind):
            node[part] = current = kind()
        node = current
    return out


# --- the values ----------------------------------------------------------------------------------------

NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity"]).map(Raw) | st.builds(
    lambda sign, exponent: Raw(f"{sign}1e{exponent}"), st.sampled_from(["", "-"]), st.integers(309, 10**6)
)
HUGE_INTEGERS = st.integers(min_value=2**63, max_value=10**200) | st.integers(
    min_value=-(10**200), max_value=-(2**63) - 1
)
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
BAD_TEXT = st.builds(
    lambda before, bad, after: before + bad + after,
    st.text(max_size=8),
    SURROGATES | st.just("\x00"),
    st.text(max_size=8),
)
DEEP = st.integers(MAX_DEPTH + 1, 3000).map(nested)  # past ~1000 levels json.loads itself gives up
HOSTILE = NON_FINITE | HUGE_INTEGERS | BAD_TEXT | DEEP

# One of each, by name, for tables of route x field x value.
HOSTILE_TABLE: dict[str, Any] = {
    "NaN": Raw("NaN"),
    "Infinity": Raw("Infinity"),
    "-Infinity": Raw("-Infinity"),
    "1e400": Raw("1e400"),
    "2**63": 2**63,
    "-2**63-1": -(2**63) - 1,
    "10**30": 10**30,
    "lone high surrogate": "a cat \ud800",
    "lone low surrogate": "\udfff",
    "NUL": "a\x00cat",
    f"nested {MAX_DEPTH + 1}": nested(MAX_DEPTH + 1),
    "nested 5000": nested(5000),
}


def is_deep(value: Any) -> bool:
    return isinstance(value, Raw) and value.text.startswith("[")


def refusal_problem(response: Any, path: str, field: str | None) -> str | None:
    """What is wrong with `response` as the refusal of a request spoiled at `field` (None: fine).
    The error shape is `{"error": {message, type, param, code}}`; the OpenAI dialect answers 400
    with a string code, the others 422 with the status as the code."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not the error shape: {response.status_code} {response.text[:200]}"
    openai = path in OPENAI_ROUTES
    if response.status_code != (400 if openai else 422):
        return f"status {response.status_code}: {error}"
    if error.get("param") != field:
        return f"param {error.get('param')!r}, not {field!r}: {error}"
    if not (isinstance(error.get("message"), str) and error["message"].startswith(f"{field}: ")):
        return f"the message does not name {field!r} first: {error}"
    if error.get("type") != "invalid_request_error" or isinstance(error.get("code"), int) == openai:
        return f"type or code: {error}"
    return None
