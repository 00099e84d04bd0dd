"""Hostile input at every route of the Serve app: a 4xx in the route's error shape naming the field.

What a client may send: NaN and Infinity (Python's `json.dumps` writes them), `1e400`, integers past
64 bits, lone surrogates and NUL in any string (and in query and path parameters), JSON nested past
`MAX_DEPTH`, a wrong Content-Type, bodies cut short, too large or too slow to arrive. Each is sent
to each route through the app's ASGI interface in this process (no Ray); the OpenAPI schema's
negative mode (schemathesis) runs the same way. The app has no generators here: a request that
got past every check would find none, so passing also means no hostile request reaches one.
(tests/test_fuzz.py fuzzes the whole server on a local Ray, valid requests included.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hostile import HOSTILE, HOSTILE_TABLE, Raw, encode, is_deep, nested, refusal_problem, with_value
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from ray.serve import context as serve_context
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.config import DeploymentConfig
from ray.serve.schema import ReplicaRank
from schemathesis import GenerationMode
from test_asyncjobs import SPEC

from app.serve.app import Ingress, api
from app.serve.config import load_serve_config
from app.serve.core import resolve_serve_models

KEY = "hostile-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 1.0
JSON = {"content-type": "application/json"}


class ReachedGenerator(Exception):
    """A request got past every check to the render step (there are no generators here)."""


class NoGenerators(dict):
    def __missing__(self, base: str):
        raise ReachedGenerator(f"a request reached the render step for base model {base!r}")


@pytest.fixture(scope="module")
def ingress(tmp_path_factory, model_catalog):
    """The Serve app's ingress replica object, its routes reached in-process: the class
    `@serve.ingress` wrapped, built as Serve builds it, and Serve's replica context pointing at it
    (what the routes' `self` and the middlewares look up)."""
    config = load_serve_config(
        None,
        output_uri=str(tmp_path_factory.mktemp("hostile-out")),
        api_keys=[KEY],
        steps=2,
        default_size="128x128",
        limits={"max_body_bytes": MAX_BODY, "body_timeout_s": BODY_TIMEOUT_S, "max_prompt_chars": 200},
    )
    ingress_class = Ingress.func_or_class.__bases__[0]  # without Serve's ASGI replica wrapper
    replica = ingress_class(config, resolve_serve_models(config), NoGenerators(), None)
    context = serve_context.ReplicaContext(
        replica_id=ReplicaID("hostile-input", DeploymentID("Ingress", "imagefab")),
        servable_object=replica,
        _deployment_config=DeploymentConfig(),
        rank=ReplicaRank(rank=0, node_rank=0, local_rank=0),
        world_size=1,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_context, "_INTERNAL_REPLICA_CONTEXT", context)
        yield replica


@pytest.fixture(scope="module")
def client(ingress):
    with TestClient(api, headers=AUTH) as c:  # a 5xx raises here, with its traceback
        yield c


# --- the routes and their fields -------------------------------------------------------------------------

# Routes that read a JSON body themselves (no body model in the schema), with a valid body each.
SELF_READ = {
    ("POST", "/v1/jobs"): {"spec": SPEC, "rows": [{"prompt": "a boot"}], "priority": 1, "metadata": {"a": "b"}},
    ("POST", "/v1/batches"): {"endpoint": "/v1/images/generations", "input_file_id": "file-x", "metadata": {}},
    ("POST", "/sdapi/v1/options"): {"sd_model_checkpoint": "tiny-sdxl"},
}
VALID = {
    "/v1/generate": {"prompt": "a cat", "loras": [{"name": "tiny-style", "weight": 0.5}], "tags": {"sku": "1"}},
    "/v1/images/generations": {"prompt": "a cat", "size": "128x128"},
    "/sdapi/v1/txt2img": {"prompt": "a cat", "width": 128, "height": 128, "override_settings": {}},
    "/sdapi/v1/png-info": {"image": "aGk="},
}
# Fields below the top level, spoiled too.
NESTED = {
    "/v1/generate": ["loras.0.weight", "loras.0.name", "tags.sku"],
    "/sdapi/v1/txt2img": ["override_settings.sd_model_checkpoint", "alwayson_scripts.x.args.0"],
    "/v1/jobs": ["spec.steps", "spec.guidance", "spec.input.prompt_template", "rows.0.prompt", "rows.0.seed"],
    "/v1/batches": ["metadata.note"],
}


def json_routes() -> dict[tuple[str, str], tuple[dict, list[str]]]:
    """Every route that reads a JSON body: (a valid body, the fields to spoil). Routes with a body
    model come from the OpenAPI schema, so a route added later is covered as it is declared."""
    schema = api.openapi()
    routes: dict[tuple[str, str], tuple[dict, list[str]]] = {}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" not in content:
                continue
            model = schema["components"]["schemas"][content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
            valid = VALID.get(path) or {name: "a cat" for name in model.get("required", ())}
            routes[(method.upper(), path)] = (valid, sorted(model["properties"]) + NESTED.get(path, []))
    for (method, path), valid in SELF_READ.items():
        routes[(method, path)] = (valid, sorted(valid) + NESTED.get(path, []))
    return routes


ROUTES = json_routes()


def test_the_route_table_covers_every_json_route():
    assert {
        ("POST", "/v1/generate"),
        ("POST", "/v1/images/generations"),
        ("POST", "/sdapi/v1/txt2img"),
        ("POST", "/sdapi/v1/png-info"),
        *SELF_READ,
    } <= set(ROUTES)


def send_spoiled(client: TestClient, route: tuple[str, str], field: str, value: Any):
    method, path = route
    valid, _ = ROUTES[route]
    return client.request(method, path, content=encode(with_value(valid, field, value)), headers=JSON)


@pytest.mark.parametrize("kind", list(HOSTILE_TABLE))
def test_each_hostile_value_in_each_field_of_each_route_is_a_4xx_naming_the_field(client, kind):
    value = HOSTILE_TABLE[kind]
    problems = []
    for route, (_, fields) in ROUTES.items():
        for field in fields:
            named = field.split(".")[0] if is_deep(value) else field  # too deep: the top-level field
            problem = refusal_problem(send_spoiled(client, route, field, value), route[1], named)
            if problem:
                problems.append(f"{route[0]} {route[1]} {field}={kind}: {problem}")
    assert not problems, "\n".join(problems[:10])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(sorted(ROUTES)), data=st.data(), value=HOSTILE)
def test_any_hostile_value_anywhere_is_a_4xx_naming_the_field(client, route, data, value):
    field = data.draw(st.sampled_from(ROUTES[route][1]), label="field")
    named = field.split(".")[0] if is_deep(value) else field
    problem = refusal_problem(send_spoiled(client, route, field, value), route[1], named)
    assert problem is None, problem


def test_hostile_values_in_query_and_path_parameters_are_4xx_naming_them(client):
    cases = [
        ("/v1/files/images/0123.png?quality=NaN", "quality", 400),
        (f"/v1/files/images/0123.webp?quality={10**30}", "quality", 400),
        ("/v1/files/images/0123.webp?quality=1e400", "quality", 400),
        ("/v1/files/images/01%0023.png", "name", 400),
        ("/v1/files/images/0123.png?expires=1%00&sig=ab", "expires", 400),
        ("/v1/jobs?state=%00", "state", 422),
        ("/v1/jobs/job_%00", "job_id", 422),
        ("/v1/files/file-%00/content", "file_id", 422),
        ("/v1/batches/batch%00", "batch_id", 422),
        ("/healthz?x%00=1", "x\x00", 422),
    ]
    for url, field, status in cases:
        response = client.get(url)
        assert response.status_code == status, (url, response.text)
        assert response.json()["error"]["param"] == field, (url, response.text)


# --- bodies that are not JSON, or not what the route reads --------------------------------------------------


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_body_that_is_not_strict_json_is_a_400_in_the_routes_shape(client, route):
    method, path = route
    valid, _ = ROUTES[route]
    whole = encode(valid)
    for body, says in [
        (whole[: len(whole) // 2], "not JSON"),  # cut short, the declared length matching
        (whole + b"}", "not JSON"),
        (b"\xff\xfe" + whole, "not UTF-8"),
        ("\ufeff".encode() + whole, "not JSON"),  # a BOM
        (b'{"prompt": "a cat", "steps": 1' + b"0" * 5000 + b"}", "64-bit"),  # past int()'s 4300 digits
    ]:
        response = client.request(method, path, content=body, headers=JSON)
        error = response.json()["error"]
        if "64-bit" in says:
            assert response.status_code in (400, 422) and error["param"] == "steps", response.text
        else:
            assert response.status_code == 400 and error["param"] is None, response.text
        assert says in error["message"], response.text


@pytest.mark.parametrize("route", [r for r in sorted(ROUTES) if r not in SELF_READ])
def test_a_body_model_route_answers_a_wrong_content_type_with_415(client, route):
    method, path = route
    body = encode(ROUTES[route][0])
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.request(method, path, content=body, headers=headers)
        assert response.status_code == 415, (content_type, response.text)
        assert response.json()["error"]["param"] == "content-type"


def test_routes_that_read_json_themselves_hold_any_content_type_to_strict_json(client):
    for route, valid in SELF_READ.items():
        for content_type in ("text/plain", "application/octet-stream", None):
            headers = {"content-type": content_type} if content_type else {}
            body = encode(with_value(valid, "x", Raw("NaN")))
            response = client.request(*route, content=body, headers=headers)
            assert response.status_code == 422 and response.json()["error"]["param"] == "x", response.text


def test_framework_errors_use_the_apps_shape(client):
    """FastAPI's own answers (validation, unknown paths and methods) in the same error shape."""
    native = client.post("/v1/generate", json={"prompt": "a cat", "steps": 0, "bogus": 1})
    assert native.status_code == 422
    error = native.json()["error"]
    assert error["param"] == "steps" and "bogus" in error["message"] and error["code"] == 422
    openai = client.post("/v1/images/generations", json={"prompt": "a cat", "n": "many"})
    assert openai.status_code == 400 and openai.json()["error"]["code"] == "invalid_value"
    assert openai.json()["error"]["param"] == "n"
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "cfg_scale": 51})
    assert a1111.status_code == 422 and a1111.json()["error"]["param"] == "cfg_scale"
    for body in (b"[1]", b'"a cat"', b"null", b""):  # not a JSON object: the body as a whole
        response = client.post("/sdapi/v1/txt2img", content=body, headers=JSON)
        assert response.status_code == 400 and response.json()["error"]["param"] is None, (body, response.text)
        assert response.json()["error"]["message"].startswith("body: ")
    for response, status in [(client.get("/v1/nothing-here"), 404), (client.delete("/v1/generate"), 405)]:
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
    assert "allowed: POST" in client.delete("/v1/generate").json()["error"]["message"]


# --- size, time, truncation: the body as it arrives -------------------------------------------------------


def asgi(method: str, path: str, headers: dict[str, str], messages: list, pause_s: float = 0.0) -> tuple:
    """One request straight through the ASGI app: `messages` are what the client's side delivers
    (after them, it waits `pause_s`, then hangs up). Returns (status or None, the answer's body,
    how many messages the app took)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {**AUTH, **headers}.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    pending = list(messages)
    taken = 0
    sent: list[dict] = []

    async def receive():
        nonlocal taken
        if pending:
            taken += 1
            return pending.pop(0)
        await asyncio.sleep(pause_s)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(api(scope, receive, send))
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"] if start else None), body, taken


def chunk(data: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_declared_length_over_the_limit_is_a_413_before_any_byte_is_read(ingress):
    for path in ("/v1/generate", "/sdapi/v1/txt2img", "/v1/images/generations"):
        headers = {**JSON, "content-length": str(MAX_BODY + 1)}
        status, body, taken = asgi("POST", path, headers, [chunk(b"{" * 1000, True)])
        assert status == 413 and taken == 0, body
        assert json.loads(body)["error"]["message"].startswith("body: ")


def test_a_chunked_body_over_the_limit_is_a_413_once_the_limit_is_passed(ingress):
    part = b" " * (16 * 1024)
    messages = [chunk(part, True) for _ in range(100)]  # 1.6 MB offered, none of it declared
    status, body, taken = asgi("POST", "/v1/generate", JSON, messages)
    assert status == 413 and taken == MAX_BODY // len(part) + 1, (body, taken)


def test_a_job_submission_may_be_as_large_as_the_jobs_policy_and_is_parsed_off_the_event_loop(ingress):
    rows = [{"prompt": f"a boot {i} " + "x" * 100} for i in range(3000)]  # ~350 KB: over max_body_bytes
    rows[2500]["seed"] = Raw("NaN")
    body = encode({"spec": SPEC, "rows": rows})
    assert MAX_BODY < len(body) < ingress.jobs.policy.max_upload_bytes
    status, answer, _ = asgi("POST", "/v1/jobs", JSON, [chunk(body, False)])
    assert status == 422 and json.loads(answer)["error"]["param"] == "rows.2500.seed", answer


def test_a_body_that_stops_arriving_is_a_408_within_the_body_timeout(ingress):
    t0 = time.monotonic()
    status, body, _ = asgi("POST", "/v1/generate", JSON, [chunk(b'{"prompt": "a ', True)], pause_s=30)
    assert status == 408 and time.monotonic() - t0 < BODY_TIMEOUT_S + 5, body
    assert "not received within" in json.loads(body)["error"]["message"]


def test_a_client_that_hangs_up_mid_body_gets_no_5xx(ingress):
    for path in ("/v1/generate", "/v1/jobs", "/sdapi/v1/options"):
        status, body, _ = asgi("POST", path, JSON, [chunk(b'{"prompt": "a', True)])
        assert status is None or 400 <= status < 500, (path, status, body)


def multipart(fields: list[tuple[str, bytes | None, bytes]], boundary: bytes = b"b0undary") -> bytes:
    out = b""
    for name, filename, data in fields:
        disposition = (
            b'form-data; name="' + name.encode() + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        )
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def test_hostile_uploads_are_4xx(client):
    line = encode({"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}})
    form = {"content-type": "multipart/form-data; boundary=b0undary"}
    good = multipart([("purpose", None, b"batch"), ("file", b"in.jsonl", line)])
    assert client.post("/v1/files", content=good, headers=form).status_code == 200
    cases = [
        (good[: good.index(b"--b0undary", 10)], "required"),  # cut short after the first part
        (good[: len(good) - 40], "line 1: not JSON"),  # cut short in the file's line
        (multipart([("purpose", None, b"\xff\xfe"), ("file", b"in.jsonl", line)]), "not UTF-8"),
        (multipart([("purpose", None, b"batch"), ("file", b"in\x00.jsonl", line)]), "NUL"),
        (multipart([("purpose", None, b"batch"), ("file", b"in.jsonl", b"\xff\xfe{")]), "not UTF-8"),
        (multipart([("purpose", None, b"ba\x00tch"), ("file", b"in.jsonl", line)]), "NUL"),
    ]
    for value in HOSTILE_TABLE.values():
        spoiled = encode(with_value(json.loads(line), "body.prompt", value))
        cases.append((multipart([("purpose", None, b"batch"), ("file", b"in.jsonl", spoiled)]), "line 1: body"))
    for body, says in cases:
        response = client.post("/v1/files", content=body, headers=form)
        assert response.status_code == 400 and says in response.json()["error"]["message"], (body[:120], response.text)
    # A file name that is not UTF-8 is read with U+FFFD in place of the bad byte: kept, and answerable.
    latin = client.post(
        "/v1/files", content=multipart([("purpose", None, b"batch"), ("file", b"in\xff.jsonl", line)]), headers=form
    )
    assert latin.status_code == 200 and latin.json()["filename"] == "in\ufffd.jsonl"
    wrong = client.post("/v1/files", content=line, headers=JSON)
    assert wrong.status_code == 400 and "multipart/form-data" in wrong.json()["error"]["message"]


def test_hostile_text_in_an_image_edit_form_is_a_400_naming_the_field(client):
    form = {"content-type": "multipart/form-data; boundary=b0undary"}
    for field in ("prompt", "model", "size", "user"):
        for bad in (b"a\x00cat", b"\x00"):
            values = {"prompt": b"a cat", field: bad}
            parts = [(name, None, value) for name, value in values.items()]
            body = multipart([*parts, ("image", b"in.png", b"never decoded: a field is refused first")])
            response = client.post("/v1/images/edits", content=body, headers=form)
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
            assert "NUL" in response.json()["error"]["message"]


# --- the OpenAPI schema's negative mode, in-process ---------------------------------------------------------

NEGATIVE_EXAMPLES = 30  # per operation


def test_the_openapi_negative_mode_gets_only_4xx_in_the_apps_shape(client):
    """schemathesis' negative mode: requests that break the schema of each operation with a body or
    query parameters (wrong types, out-of-range values, missing or extra fields, NUL in strings;
    path parameters are covered above). A request the app accepts anyway (its checks are laxer
    than the schema, e.g. "2" for an integer) reaches the render step, which this app does not
    have: counted, not failed (tests/test_fuzz.py renders those)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    statuses: Counter = Counter()
    problems: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    with_input = [
        op
        for op in operations
        if op.definition.raw.get("requestBody")
        or any(p.get("in") == "query" for p in op.definition.raw.get("parameters", []))
    ]
    assert len(with_input) >= 5, [op.label for op in with_input]
    for operation in with_input:

        @settings(
            max_examples=NEGATIVE_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        def probe(case):
            try:
                response = case.call(headers=AUTH)
            except ReachedGenerator:
                statuses["accepted"] += 1
                return
            statuses[response.status_code] += 1
            if response.status_code >= 400:
                try:
                    error = response.json().get("error")
                except ValueError:
                    error = None
                shaped = isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
                named = shaped and bool(error["message"]) and (response.status_code != 422 or bool(error["param"]))
                if not named or response.status_code >= 500:
                    problems.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:200]}"
                    )

        try:
            probe()
        except Unsatisfiable:
            pass  # nothing invalid to send: no parameters and no body
    print(f"negative mode: {dict(statuses)}")
    assert sum(statuses.values()) >= 3 * len(with_input), statuses
    assert not problems, "\n".join(problems[:10])


def test_nested_is_as_deep_as_asked():
    assert json.loads(nested(7).text) == [{"k": [{"k": [{"k": [0]}]}]}]
