"""Request bodies, checked before any route sees them: size, arrival time, and strict JSON.

Python's `json` accepts text the rest of the app cannot carry: `NaN` and `Infinity` (a float that
no JSON response can hold), `1e400` (read as infinity), integers of any length (a 64-bit column or
seed overflows), lone surrogates such as `"\\ud800"` (no UTF-8 encoder takes them) and NUL in
strings. `strict_json` refuses all of these, and nesting deeper than `MAX_DEPTH`, with a
`BodyError` that names the field (`loras.0.weight`).

`BodyGuard`, a pure ASGI middleware, reads a body when the route first asks for it (so the route,
and with it the route's own size limit, is known), refuses one that is too large or too slow to
arrive, and puts every JSON body (`Content-Type: application/json` or `…+json`) through
`strict_json`. `text_parameters` holds query and path parameters to the same rule for text.
`BodyError` is an `HTTPException`: FastAPI passes it on untouched from a body read,
and the app's exception handler answers in the route's dialect. Routes that read JSON themselves,
whatever the content type, call `strict_json` directly.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_DEPTH = 32  # the API's bodies nest about 6 deep (a job's spec); JSON deeper than this is refused
INT64 = (-(2**63), 2**63 - 1)  # seeds, counts and sizes are 64-bit everywhere downstream
OFF_LOOP_BYTES = 256 * 1024  # bodies larger than this are parsed in a thread, not on the event loop
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


class BodyError(HTTPException):
    """A body the app does not read: the HTTP status, the field at fault (None: the body as a
    whole) and why."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(status, f"{field or 'body'}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class BodyRules:
    """What a route accepts: at most `max_bytes`, all of it within `timeout_s` of the first read."""

    max_bytes: int
    timeout_s: float


def text_problem(text: str) -> str | None:
    """Why a string cannot be taken as text (NUL, a lone surrogate), or None."""
    found = _BAD_CHARACTER.search(text)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return f"holds a NUL character at position {found.start()}"
    return f"holds a lone surrogate (\\u{ord(char):04x}) at position {found.start()}: not Unicode text"


@dataclass(frozen=True)
class _Refused:
    """A number json.loads reads and the API refuses, left in place until its field is known."""

    why: str


def _int(text: str) -> int | _Refused:
    digits = text.lstrip("-")
    if len(digits) <= 19:  # int() of a huge digit string is slow, or refused past 4300 digits
        value = int(text)
        if INT64[0] <= value <= INT64[1]:
            return value
    shown = text if len(text) <= 24 else f"{text[:20]}… ({len(digits)} digits)"
    return _Refused(f"{shown} is outside the 64-bit integer range")


def _float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text[:24]} is too large for a 64-bit float")


def _constant(name: str) -> _Refused:  # NaN, Infinity, -Infinity: Python's json.dumps writes them
    return _Refused(f"{name} is not a number JSON allows; send a finite number")


def _dotted(path: tuple) -> str | None:
    return ".".join(str(p) for p in path) or None


def strict_json(raw: bytes | str) -> Any:
    """The JSON value of `raw`, or a `BodyError` naming the field that no part of the app can carry."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BodyError(400, None, f"not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        field = _top_field_of_deep_nesting(raw)
        raise BodyError(422, field, f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise BodyError(400, None, f"not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    _check(value)
    return value


def _check(value: Any) -> None:
    """Walks the parsed value (depth first, in document order) to the first thing it refuses."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Refused):
            raise BodyError(422, _dotted(path), node.why)
        if isinstance(node, str):
            if problem := text_problem(node):
                raise BodyError(422, _dotted(path), problem)
        elif isinstance(node, dict | list):
            if len(path) >= MAX_DEPTH:
                top = path[0] if isinstance(path[0], str) else None
                raise BodyError(422, top, f"nested deeper than {MAX_DEPTH} levels")
            items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            for key, _ in items:
                if isinstance(key, str) and (problem := text_problem(key)):
                    raise BodyError(422, _dotted((*path, key)), f"the key {problem}")
            stack.extend(((child, (*path, key)) for key, child in reversed(items)))


def _top_field_of_deep_nesting(text: str) -> str | None:
    """The top-level key under which `text` nests deeper than MAX_DEPTH (json.loads gave up first)."""
    depth, key, expect_key = 0, None, False
    for token in _JSON_TOKEN.finditer(text):
        t = token.group()
        if t in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return key
            expect_key = t == "{" and depth == 1
        elif t in ("]", "}"):
            depth -= 1
        elif t == ",":
            expect_key = depth == 1 and key is not None
        elif expect_key and depth == 1:
            try:
                key = json.loads(t)
            except ValueError:  # json.loads got past this key before giving up, so it is valid
                key = None
            expect_key = False
    return None


async def text_parameters(request: Request) -> None:
    """A FastAPI dependency: no query or path parameter holds a NUL (or, decoded some other way than
    the server's own, a lone surrogate), as no JSON string may."""
    for name, value in [*request.query_params.multi_items(), *request.path_params.items()]:
        if problem := text_problem(name) or text_problem(str(value)):
            raise BodyError(422, name, problem)


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyGuard:
    """Reads each request's body whole on the route's first read: past `rules(scope).max_bytes` a 413
    (a declared Content-Length above it is refused before a byte is read), not complete within
    `timeout_s` a 408 (a slow or stalled upload holds no replica), and a JSON body must pass
    `strict_json`. The route then reads the same bytes. A route that never reads its body never
    waits for it."""

    def __init__(self, app: ASGIApp, rules: Callable[[Scope], BodyRules]):
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = False

        async def receive_checked() -> Message:
            nonlocal read
            if read:  # the body was handed over: what follows is the disconnect
                return await receive()
            read = True
            return await self._whole_body(scope, receive)

        await self.app(scope, receive_checked, send)

    async def _whole_body(self, scope: Scope, receive: Receive) -> Message:
        rules = self.rules(scope)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > rules.max_bytes:
            raise BodyError(413, None, f"{declared} bytes; at most {rules.max_bytes}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rules.timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyError(
                    408, None, f"not received within {rules.timeout_s:g} s ({size} bytes arrived)"
                ) from None
            if message["type"] == "http.disconnect":  # the answer reaches no one; it ends the request quietly
                raise BodyError(400, None, f"the connection closed after {size} bytes, before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > rules.max_bytes:
                raise BodyError(413, None, f"more than {rules.max_bytes} bytes (at most {rules.max_bytes})")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and is_json(headers.get("content-type")):
            if len(body) > OFF_LOOP_BYTES:
                await asyncio.to_thread(strict_json, body)
            else:
                strict_json(body)
        return {"type": "http.request", "body": body, "more_body": False}
