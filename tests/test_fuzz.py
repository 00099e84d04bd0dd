"""Hostile input, generated: the HTTP API fuzzed from its own OpenAPI schema (schemathesis), the
spec parser and the row expansion fuzzed with hypothesis. Bounded: a fixed number of examples per
operation or property, and a wall-clock budget for the HTTP fuzz.

- HTTP: never a 5xx except a deliberate 503/504; a 4xx always says what is wrong (a field, or a
  message); bodies and prompts over the limits are refused before any generator call; the
  hostile values of tests/hostile.py and a stalled upload are refused by the running server too
  (tests/test_hostile_input.py sends them to every route and field in-process).
- Spec: specs whose every value is in range parse, keep their values and read back the same from
  what a run records; a value out of range is a `SpecError` naming its field path; and whatever
  the YAML holds, `parse_spec` / `load_spec` raise nothing but a `SpecError` that says where.
- Rows: `ExpandRows` never raises; a row it cannot use becomes a `failed` row with the reason.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections import Counter

import httpx
import pyarrow as pa
import pytest
import schemathesis
import yaml
from hostile import HOSTILE_TABLE, encode, is_deep, refusal_problem
from hostile import with_value as spoiled
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from ports import free_port
from schemathesis import GenerationMode

from app.expand import ExpandRows, ResolvedModels
from app.request import RenderRequest
from app.schedulers import SCHEDULERS
from app.spec import MAX_SIDE, MIN_SIDE, SIZE_PRESETS, SpecError, load_spec, parse_spec

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 50  # per operation and per mode (valid / invalid requests)
HTTP_BUDGET_S = 150  # the whole schemathesis run; past it, remaining examples are not sent
LIMITS = {
    "max_in_flight": 4,
    "max_images": 2,
    "max_prompt_chars": 200,
    "max_body_bytes": 8192,
    "max_side": 128,
    "max_pixels": 128 * 128,
    "max_steps": 2,
    "request_timeout_s": 60,
    "body_timeout_s": 2,
}


# --- the HTTP API --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    """The real Serve app on loopback, with limits that keep any valid request to a tiny render."""
    from ray import serve

    from app.serve.app import build_app
    from app.serve.config import load_serve_config

    port = free_port()
    config = load_serve_config(
        None,
        output_uri=str(tmp_path_factory.mktemp("fuzz-out")),
        port=port,
        steps=2,
        api_keys=[KEY],
        default_size="128x128",
        combinations={"default": {"loras": [{"name": "tiny-style", "weight": 0.8}]}, "plain": {}},
        batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.0},
        limits=LIMITS,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagefab-fuzz", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=AUTH)
    yield client
    client.close()
    serve.shutdown()


def names_the_problem(response: httpx.Response) -> bool:
    """Every error, the framework's included, is {"error": {"message", "type", "param", "code"}};
    a 422 names its field in `param`."""
    try:
        body = response.json()
    except ValueError:
        return False
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return False
    return bool(err.get("message")) and (response.status_code != 422 or bool(err.get("param")))


@pytest.mark.slow
@pytest.mark.ray
def test_api_answers_bad_input_with_a_4xx_that_names_it(server):
    """Every operation of the served OpenAPI schema, up to 50 valid and 50 invalid requests each.

    (schemathesis' own pytest plugin does not run under pytest 9, so its strategies are driven
    here with hypothesis directly.) Failures are collected, not shrunk: the run stays bounded."""
    schema = schemathesis.openapi.from_url(str(server.base_url).rstrip("/") + "/openapi.json")
    deadline = time.monotonic() + HTTP_BUDGET_S
    sent, problems = Counter(), []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def probe(case):
                if time.monotonic() > deadline:
                    return  # bounded in time: the budget's remaining examples are not sent
                response = case.call(headers=AUTH, timeout=60)
                status = response.status_code
                sent[status] += 1
                server_error = status >= 500 and status not in (503, 504)
                unexplained = 400 <= status < 500 and not names_the_problem(response)
                if server_error or unexplained or (status == 503 and not response.headers.get("retry-after")):
                    problems.append(
                        f"{case.method} {case.formatted_path} [{mode.value}] -> {status} "  # noqa: B023 (called in this iteration)
                        f"{response.text[:300]}\n  {case.as_curl_command()[:400]}"
                    )

            try:
                probe()
            except Unsatisfiable:
                pass  # nothing invalid to send: the operation takes no parameters and no body
    assert sum(sent.values()) >= len(operations) * 10, sent
    print(f"HTTP fuzz: {sum(sent.values())} requests over {len(operations)} operations, by status {dict(sent)}")
    assert not problems, "\n".join(problems[:10])


def generator_calls(client: httpx.Client) -> tuple[int, int]:
    stats = client.get("/v1/stats").json()["generators"]["tiny-sdxl"]
    return stats["calls"], stats["images"]


@pytest.mark.slow
@pytest.mark.ray
def test_oversized_bodies_and_prompts_are_refused_before_any_generator_call(server):
    client = server
    before = generator_calls(client)
    too_long = "a" * (LIMITS["max_prompt_chars"] + 1)
    big = "x" * LIMITS["max_body_bytes"]

    def chunked(payload: dict):  # no Content-Length: the size is only known once read
        data = json.dumps(payload).encode()
        return (data[i : i + 1000] for i in range(0, len(data), 1000))

    cases = [
        (client.post("/v1/generate", json={"prompt": "a cat", "tags": {"x": big}}), 413, None),
        (
            client.post(
                "/v1/generate",
                content=chunked({"prompt": "a cat", "tags": {"x": big}}),
                headers={"content-type": "application/json"},
            ),
            413,
            None,
        ),
        (client.post("/sdapi/v1/png-info", json={"image": big}), 413, None),
        (client.post("/v1/generate", json={"prompt": too_long}), 422, "prompt"),
        (client.post("/v1/generate", json={"prompt": "a cat", "negative_prompt": too_long}), 422, "negative_prompt"),
        # The OpenAI dialect answers as OpenAI does: 400, not 422.
        (client.post("/v1/images/generations", json={"prompt": too_long, "size": "128x128"}), 400, "prompt"),
        (
            client.post("/sdapi/v1/txt2img", json={"prompt": too_long, "width": 128, "height": 128, "steps": 2}),
            422,
            "prompt",
        ),
        (client.post("/v1/generate", json={"prompt": "a cat", "n": LIMITS["max_images"] + 1}), 422, "n"),
        (client.post("/v1/generate", json={"prompt": "a cat", "width": 136, "height": 128}), 422, "size"),
        (client.post("/v1/generate", json={"prompt": "a cat", "steps": LIMITS["max_steps"] + 1}), 422, "steps"),
        (
            client.post("/v1/generate", json={"prompt": "a cat", "loras": [{"name": "tiny-style", "weight": 10**400}]}),
            422,
            "loras.0.weight",
        ),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.text[:300]
        assert response.json()["error"]["param"] == field
    assert generator_calls(client) == before, "a refused request reached a generator"


@pytest.mark.slow
@pytest.mark.ray
def test_hostile_values_are_refused_by_the_running_server(server):
    """The refusals of tests/test_hostile_input.py through Ray Serve's proxy and a real ingress
    replica: NaN, Infinity, 1e400, 2**63, lone surrogates, NUL and deep nesting in a field of each
    dialect, a wrong Content-Type, an unknown path; none reaches a generator."""
    client = server
    before = generator_calls(client)
    fields = [
        ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 128, "height": 128}, "cfg_scale"),
        ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 128, "height": 128}, "denoising_strength"),
        ("/v1/generate", {"prompt": "a cat"}, "guidance"),
        ("/v1/generate", {"prompt": "a cat"}, "negative_prompt"),
        ("/v1/images/generations", {"prompt": "a cat", "size": "128x128"}, "prompt"),
        ("/v1/jobs", {"rows": [{"prompt": "a boot"}]}, "rows.0.prompt"),
    ]
    problems = []
    for path, valid, field in fields:
        for kind, value in HOSTILE_TABLE.items():
            body = encode(spoiled(valid, field, value))
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            named = field.split(".")[0] if is_deep(value) else field
            if len(body) > LIMITS["max_body_bytes"] and path != "/v1/jobs":  # jobs: the jobs policy's limit
                if response.status_code != 413:
                    problems.append(f"{path} {field}={kind}: {response.status_code}, not 413 for {len(body)} bytes")
            elif problem := refusal_problem(response, path, named):
                problems.append(f"{path} {field}={kind}: {problem}")
    assert not problems, "\n".join(problems[:10])
    wrong_type = client.post("/v1/generate", content=b'{"prompt": "a cat"}', headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415 and wrong_type.json()["error"]["param"] == "content-type"
    assert names_the_problem(client.get("/v1/no-such-route"))
    assert generator_calls(client) == before, "a refused request reached a generator"


@pytest.mark.slow
@pytest.mark.ray
def test_a_stalled_upload_is_a_408_and_frees_the_request(server):
    """A body that stops arriving (a slow-loris client) is answered 408 after `body_timeout_s`."""
    host, port = server.base_url.host, server.base_url.port
    head = (
        f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=30) as sock:
        t0 = time.monotonic()
        sock.sendall(head.encode() + b'{"prompt": "a')
        answer = sock.recv(65536)
        waited = time.monotonic() - t0
        while b"}}" not in answer and (more := sock.recv(65536)):  # the body may come in its own packet
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert LIMITS["body_timeout_s"] <= waited < LIMITS["body_timeout_s"] + 10, waited
    assert b"not received within" in answer


# --- the spec parser -------------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "tiny-sdxl",
            "tiny-style",
            "256x256",
            "sdxl-square",
            "{name}",
            "{",
            "qc:/x@y",
            "fixed",
            "derived",
            "euler",
            "jpeg",
            "../../etc/passwd",
            "s3://b/p",
            "",
        ]
    )
)
YAMLISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=16,
)
VALID = {
    "run_name": "fuzz",
    "input": {"path": "/data/rows.csv", "prompt_template": "photo of {name}"},
    "size": "tiny-square",
    "steps": 4,
    "model": {"loras": [{"name": "tiny-style", "weight": 0.5}]},
}
FIELDS = [
    "run_name",
    "input",
    "input.path",
    "input.format",
    "input.prompt_template",
    "input.limit",
    "input.key_column",
    "negative_prompt",
    "variations",
    "variations.seeds_per_row",
    "variations.seed_mode",
    "variations.base_seed",
    "variations.seeds",
    "model",
    "model.base",
    "model.loras",
    "model.catalog",
    "steps",
    "guidance",
    "scheduler",
    "size",
    "size.width",
    "combinations",
    "combinations.a",
    "combinations.a.loras",
    "combinations.a.steps",
    "tiers",
    "tiers.routes",
    "tiers.default",
    "ab_test",
    "ab_test.combinations",
    "qc",
    "qc.min_sharpness",
    "qc.clip_model",
    "postprocess",
    "postprocess.presets",
    "postprocess.watermark",
    "postprocess.watermark.text",
    "output",
    "output.uri",
    "tags",
    "static_tags",
    "compute",
    "compute.generators",
    "compute.batch_size",
    "compute.device",
    "unknown_field",
]


def with_value(data: dict, dotted: str, value) -> dict:
    out = json.loads(json.dumps(data))
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value
    return out


def only_spec_errors(where: tuple[str, ...], fn, *args) -> None:
    """`fn(*args)` parses or raises a `SpecError` whose message starts with where the spec came
    from and goes on to say what is wrong; any other exception fails the test."""
    try:
        fn(*args)
    except SpecError as e:
        message = str(e)
        assert message.startswith(tuple(f"{w}: " for w in where)), message
        assert len(message.split(": ", 1)[1].strip()) > 5, message


# --- valid specs: they parse, keep their values and survive the run record ---

SIDES = st.integers(MIN_SIDE // 8, MAX_SIDE // 8).map(lambda n: 8 * n)
SEEDS = st.integers(0, 2**63 - 1)


def lora_stacks(names: list[str]) -> st.SearchStrategy:
    return st.tuples(*[st.builds(lambda w, n=n: {"name": n, "weight": w}, st.floats(-4.0, 4.0)) for n in names])


VALID_SPECS = st.fixed_dictionaries(
    {
        "run_name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
        "input": st.fixed_dictionaries(
            {
                "path": st.sampled_from(["/data/rows.csv", "/data/rows.tsv", "s3://bucket/rows.parquet"]),
                "prompt_template": st.sampled_from(["photo of {name}", "a {color} {product}, studio", "{subject}"]),
            },
            optional={"limit": st.integers(1, 10**6), "key_column": st.sampled_from(["pid", "sku"])},
        ),
    },
    optional={
        "negative_prompt": st.text(max_size=40),
        "steps": st.integers(1, 500),
        "guidance": st.floats(0.0, 50.0),
        "scheduler": st.sampled_from(list(SCHEDULERS)),
        "size": st.sampled_from(list(SIZE_PRESETS))
        | st.builds("{}x{}".format, SIDES, SIDES)
        | st.fixed_dictionaries({"width": SIDES, "height": SIDES}),
        "variations": st.fixed_dictionaries(
            {"seeds_per_row": st.integers(1, 10_000)},
            optional={"seed_mode": st.sampled_from(["derived", "fixed"]), "base_seed": SEEDS},
        )
        | st.lists(SEEDS, min_size=1, max_size=5).map(
            lambda seeds: {"seed_mode": "fixed", "seeds_per_row": len(seeds), "seeds": seeds}
        ),
        "model": st.lists(st.sampled_from(["tiny-style", "tiny-detail", "brand-look"]), unique=True, max_size=3)
        .flatmap(lora_stacks)
        .map(lambda stack: {"loras": list(stack)}),
        "tags": st.lists(st.sampled_from(["pid", "sku", "category"]), unique=True, max_size=3),
        "static_tags": st.dictionaries(
            st.sampled_from(["campaign", "brand"]), st.text(max_size=10) | st.integers(0, 9999)
        ),
        "output": st.fixed_dictionaries({"uri": st.sampled_from(["outputs", "s3://bucket/run", "/srv/imagefab"])}),
        "compute": st.fixed_dictionaries(
            {},
            optional={
                "batch_size": st.integers(1, 256),
                "device": st.sampled_from(["auto", "cuda", "cpu"]),
                "generators": st.none() | st.integers(1, 1024),
            },
        ),
    },
)


def expected_size(value) -> tuple[int, int]:
    if isinstance(value, dict):
        return value["width"], value["height"]
    if value in SIZE_PRESETS:
        return SIZE_PRESETS[value]
    width, height = value.split("x")
    return int(width), int(height)


@settings(max_examples=300, deadline=None)
@given(VALID_SPECS)
def test_valid_specs_parse_keep_their_values_and_read_back_from_the_run_record(data):
    spec = parse_spec(data)
    assert spec.run_name == data["run_name"] and spec.input.path == data["input"]["path"]
    assert spec.input.prompt_template == data["input"]["prompt_template"]
    for field in ("negative_prompt", "steps", "guidance", "scheduler"):
        if field in data:
            assert getattr(spec, field) == data[field], field
    if "size" in data:
        assert (spec.size.width, spec.size.height) == expected_size(data["size"])
    if "variations" in data:
        assert spec.variations.seeds_per_row == data["variations"]["seeds_per_row"]
        assert list(spec.variations.seeds) == data["variations"].get("seeds", [])
    if "model" in data:
        assert [(lo.name, lo.weight) for lo in spec.model.loras] == [
            (lo["name"], lo["weight"]) for lo in data["model"]["loras"]
        ]
    if "static_tags" in data:  # YAML numbers become text: tags are text in the catalog
        assert spec.static_tags == {k: str(v) for k, v in data["static_tags"].items()}
    # A run records its spec as YAML-able JSON with only the fields that were set (run.json), and
    # regenerate and the registry parse it back: the same spec, defaults applied again.
    recorded = yaml.safe_dump(spec.model_dump(mode="json", exclude_unset=True))
    assert parse_spec(yaml.safe_load(recorded)) == spec
    assert parse_spec(spec.model_dump(mode="json")) == spec


# --- values out of range: a SpecError naming the field path ---

INVALID = {
    # path in the spec -> (out-of-range values, the path the error names, whether it shows the value)
    "run_name": (st.sampled_from(["no spaces", "-starts-with-dash", "", "x" * 65, "a/b"]), "run_name", True),
    "steps": (st.integers(max_value=0) | st.integers(min_value=501), "steps", True),
    "guidance": (st.floats(max_value=-0.001) | st.floats(min_value=50.001) | st.just(math.nan), "guidance", False),
    "scheduler": (st.text(max_size=12).filter(lambda s: s not in SCHEDULERS), "scheduler", True),
    "size": (
        st.builds("{}x{}".format, st.integers(MIN_SIDE, MAX_SIDE).filter(lambda n: n % 8), SIDES)
        | st.builds("{}x{}".format, st.sampled_from([0, 8, MIN_SIDE - 8, MAX_SIDE + 8]), SIDES),
        "size",
        False,
    ),
    "variations.seeds_per_row": (
        st.integers(max_value=0) | st.integers(min_value=10_001),
        "variations.seeds_per_row",
        True,
    ),
    "variations.base_seed": (st.integers(max_value=-1) | st.integers(min_value=2**63), "variations.base_seed", True),
    "model.loras": (
        (st.floats(max_value=-4.001) | st.floats(min_value=4.001)).map(lambda w: [{"name": "tiny-style", "weight": w}]),
        "model.loras[0].weight",
        False,
    ),
    "input.limit": (st.integers(max_value=0), "input.limit", True),
    "compute.batch_size": (st.integers(max_value=0) | st.integers(min_value=257), "compute.batch_size", True),
    "postprocess.quality": (st.integers(max_value=0) | st.integers(min_value=101), "postprocess.quality", True),
    "unknown_field": (st.integers(), "unknown_field", False),
    "compute.gpus": (st.integers(1, 8), "compute.gpus", False),
}


@settings(max_examples=300, deadline=None)
@given(VALID_SPECS, st.sampled_from(sorted(INVALID)).flatmap(lambda f: st.tuples(st.just(f), INVALID[f][0])))
def test_an_out_of_range_value_is_a_spec_error_naming_its_field(data, bad):
    field, value = bad
    _, named, shows_value = INVALID[field]
    with pytest.raises(SpecError) as raised:
        parse_spec(with_value(data, field, value))
    message = str(raised.value)
    assert f"\n  {named}: " in message, message
    if shows_value:
        assert f"(got {value!r})" in message, message


# --- anything at all: only SpecErrors, and they say where ---


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12) | st.integers(), YAMLISH, max_size=6))
def test_arbitrary_mappings_raise_only_spec_errors(data):
    only_spec_errors(("<spec>",), parse_spec, data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELDS), YAMLISH)
def test_a_valid_spec_with_any_field_replaced_raises_only_spec_errors(field, value):
    only_spec_errors(("<spec>",), parse_spec, with_value(VALID, field, value))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.sampled_from(["steps: " + "9" * 5000, "[[[[", "a: &x [*x]", "\x00", "- 1"]))
def test_any_yaml_text_raises_only_spec_errors(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    only_spec_errors((str(path),), load_spec, path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dotted=st.sampled_from([*FIELDS, "steps.x", "run_name.a.b", "tags.0", "model.loras.0.weight", "input.path.x"])
    | st.text(max_size=20),
    value=YAMLISH,
)
def test_any_override_raises_only_spec_errors(tmp_path, dotted, value):
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(VALID))  # JSON is YAML
    only_spec_errors((str(path), "overrides"), load_spec, path, {dotted: value})


# --- the row expansion ------------------------------------------------------------------------------------

NUMBERISH = [
    "1e400",
    "-1e400",
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1.5",
    "64",
    "128",
    "1024",
    "4104",
    "9" * 30,
    "9007199254740993",
    " 256 ",
    "0x10",
    "",
    " ",
]
LORAISH = [
    "tiny-style:0.5",
    "tiny-style:inf",
    "tiny-style:nan",
    "tiny-style:1e400",
    "tiny-style",
    "tiny-style:5",
    "tiny-detail:0.3, tiny-style:0.2",
    "tiny-style:0.1,tiny-style:0.2",
    "../../etc/passwd:1",
    "/etc/passwd",
    "tiny-style-b:1",
    "tiny-ghost:0.5",
    ",,",
    ":",
    ":1",
    "tiny-style:0.5:extra",
    "tiny-style;tiny-detail",
]
COLUMNS = ["name", "pid", "prompt", "negative_prompt", "seed", "width", "height", "loras"]


@st.composite
def input_tables(draw) -> pa.Table:
    """An input batch as Ray Data hands it over: each column one Arrow type (CSV: text), nulls anywhere."""
    n = draw(st.integers(1, 6))
    columns = {}
    for name in draw(st.lists(st.sampled_from(COLUMNS), unique=True, min_size=1)):
        kind = draw(st.sampled_from(["string", "float", "int"]))
        if kind == "string":
            values = st.text(max_size=30) | st.sampled_from(NUMBERISH + LORAISH)
            arrow = pa.string()
        elif kind == "float":
            values, arrow = st.floats(), pa.float64()
        else:
            values, arrow = st.integers(-(2**63), 2**63 - 1), pa.int64()
        columns[name] = pa.array(draw(st.lists(st.none() | values, min_size=n, max_size=n)), type=arrow)
    return pa.table(columns)


@pytest.fixture(scope="module")
def models(tiny_base, model_catalog):
    loras = {n: model_catalog.resolve_lora(n, tiny_base) for n in ("tiny-style", "tiny-detail")}
    return ResolvedModels.single(tiny_base, loras=loras, known_loras=tuple(model_catalog.names("lora")))


SPECS = {
    "template": {
        **VALID,
        "tags": ["pid"],
        "variations": {"seeds_per_row": 2},
        "input": {"path": "/x.csv", "prompt_template": "photo of {name}", "key_column": "pid"},
    },
    "prompt column": {
        **VALID,
        "variations": {"seeds_per_row": 1, "seed_mode": "fixed", "base_seed": 3},
        "input": {"path": "/x.parquet"},
    },
}


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_any_rows_expand_without_raising_bad_ones_fail_with_a_reason(models, spec_name):
    spec = parse_spec(SPECS[spec_name])
    expand = ExpandRows(spec, models)

    @settings(max_examples=300, deadline=None)
    @given(input_tables())
    def check(table):
        out = expand(table).to_pydict()
        assert len(out["image_id"]) == table.num_rows * spec.variations.seeds_per_row
        for status, error, request in zip(out["status"], out["error"], out["request"]):
            assert status in ("pending", "failed")
            if status == "failed":
                assert error.startswith("bad_row: ") and len(error) > len("bad_row: ")
                continue
            req = RenderRequest.from_arrow_value(request)
            assert req.prompt.strip() and req.width % 8 == 0 and req.height % 8 == 0
            assert min(req.width, req.height) >= MIN_SIDE and max(req.width, req.height) <= MAX_SIDE
            assert 0 <= req.seed < 2**63
            assert all(
                lo.name in models.loras and -4 <= lo.weight <= 4 and not math.isnan(lo.weight) for lo in req.loras
            )

    check()
