"""Hostile input through a live `serve run`: schemathesis over the server's own OpenAPI spec, and
explicit bad values for every request field.  Every answer is a 4xx in OpenAI's error shape
naming the field (or 413 for a body over the limit); none is a 5xx, none hangs; the key set
for the server and the prompts sent never reach its logs at the default level.

One server for the module: TP = PP = 1 (the serve layer is what is under test, and it is the
same whatever the pipeline), a short context so that a generated valid request finishes fast,
and an API key (RAYPP_API_KEY on the node) so that every request also passes the key check.
"""
import hmac
import json
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from raypp.serve import auth
from raypp.serve import protocol as P
from raypp.serve.body_limit import MAX_BODY_BYTES
from tests.monitoring_helpers import RayHead
from tests.serve_helpers import ServeRun

KEY = f"key-{uuid.uuid4().hex}"
MARKER = f"zebra{uuid.uuid4().hex[:12]}"     # a prompt text that must never reach a log
HEADERS = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 48
# Generated examples per operation: the POSTs run the model, the GETs are cheap.
EXAMPLES = {"POST": 150, "GET": 25}
CALL_TIMEOUT_S = 120   # a request that takes longer than this on 2 busy cores is a hang


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    config = {"http_options": {"host": "127.0.0.1"}, "applications": [{
        "name": "raypp", "route_prefix": "/", "import_path": "raypp.serve:build_app",
        "args": {"model": {"path": str(tiny_ckpt), "served_name": "tiny", "max_model_len": MAX_MODEL_LEN},
                 "parallel": {"device": "cpu"},
                 "scheduler": {"max_num_seqs": 16, "max_queue": 32}},
        "deployments": [{"name": "LLMServer", "ray_actor_options": {"num_cpus": 0.5}}]}]}
    head = RayHead(workdir, num_cpus=2)
    # From the nodes' environment, not the args: Ray Serve logs an application's args.
    head.env["RAYPP_API_KEY"] = KEY
    head.start()
    try:
        with ServeRun(config, workdir / "serve", address=head.address) as s:
            s.ray_logs = head.temp_dir
            yield s
    finally:
        head.stop()


def post(server, path, body=None, *, content=None, headers=HEADERS, **kw):
    if content is not None:
        kw.update(content=content, headers={**headers, "content-type": "application/json"})
    else:
        kw.update(json=body, headers=headers)
    return httpx.post(server.base_url + path, timeout=CALL_TIMEOUT_S, **kw)


def assert_names(r, status, field, words=()):
    assert r.status_code == status, r.text
    err = P.ErrorResponse.model_validate(r.json()).error
    assert field in (err.param or "") or field in err.message, (field, r.text)
    for w in words:
        assert w in err.message, (w, err.message)
    return err


# ---- schemathesis over /openapi.json ---------------------------------------------------------

def test_schemathesis_every_operation_no_5xx_no_hang(server):
    # A schema-valid request may still be refused with 400 for what only the loaded model knows
    # (prompt + max_tokens over its context, token ids outside its vocabulary) or for an OpenAI
    # field raypp takes only at its no-op value; every other check keeps its defaults.
    config = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "400", "401", "404", "429"]}}})
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /v1/models", "GET /v1/models/{model}", "POST /v1/completions", "POST /v1/chat/completions",
        "GET /health", "GET /stats"}
    total = 0
    for op in operations:
        modes = st.one_of(op.as_strategy(generation_mode=GenerationMode.POSITIVE),
                          op.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES[op.method.upper()], deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=modes)
        def run(case):
            nonlocal total
            total += 1
            # All of schemathesis' checks: no 5xx, documented status codes, content types, headers
            # and response schemas, negative data rejected, positive data accepted.
            case.call_and_validate(base_url=server.base_url, headers=HEADERS, timeout=CALL_TIMEOUT_S)
        run()
    assert total >= 250, total


# ---- every field, by hand ----------------------------------------------------------------------

MSG = [{"role": "user", "content": "hi"}]
C = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": MSG, "max_tokens": 2}

# (path, body, field the error must name, words in the message)
FIELD_CASES = [
    ("/v1/completions", {**C, "model": 7}, "model", ["string"]),
    ("/v1/completions", {**C, "model": "m" * 300}, "model", ["at most 256"]),
    ("/v1/completions", {**C, "model": "nope"}, "model", ["does not exist"]),
    ("/v1/completions", {**C, "prompt": None}, "prompt", []),
    ("/v1/completions", {**C, "prompt": {"text": "hi"}}, "prompt", []),
    ("/v1/completions", {**C, "prompt": [[]]}, "prompt", ["must not be empty"]),
    ("/v1/completions", {**C, "prompt": [-1]}, "prompt", ["vocabulary"]),
    ("/v1/completions", {**C, "prompt": [1.5]}, "prompt", []),
    ("/v1/completions", {**C, "prompt": [[1]] * 65}, "prompt", ["at most 64 prompts"]),
    ("/v1/completions", {**C, "prompt": "hi " * 200}, "max_tokens", ["context length"]),
    ("/v1/completions", {**C, "max_tokens": 0}, "max_tokens", ["greater than or equal to 1"]),
    ("/v1/completions", {**C, "max_tokens": 10**30}, "max_tokens", ["context length"]),
    ("/v1/completions", {**C, "max_tokens": "2"}, "max_tokens", []),
    ("/v1/completions", {**C, "max_tokens": True}, "max_tokens", []),
    ("/v1/completions", {**C, "temperature": -0.1}, "temperature", ["greater than or equal to 0"]),
    ("/v1/completions", {**C, "temperature": 2.5}, "temperature", ["less than or equal to 2"]),
    ("/v1/completions", {**C, "top_p": 0}, "top_p", ["greater than 0"]),
    ("/v1/completions", {**C, "top_p": 1.01}, "top_p", ["less than or equal to 1"]),
    ("/v1/completions", {**C, "top_k": -2}, "top_k", ["greater than or equal to -1"]),
    ("/v1/completions", {**C, "n": 0}, "n", ["greater than or equal to 1"]),
    ("/v1/completions", {**C, "n": 65}, "n", ["less than or equal to 64"]),
    ("/v1/completions", {**C, "seed": -1}, "seed", ["greater than or equal to 0"]),
    ("/v1/completions", {**C, "seed": 2**64}, "seed", ["less than or equal to"]),
    ("/v1/completions", {**C, "stream": "yes please"}, "stream", ["boolean"]),
    ("/v1/completions", {**C, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x",
     ["unknown field"]),
    ("/v1/completions", {**C, "stream_options": [True]}, "stream_options", []),
    ("/v1/completions", {**C, "stop": ""}, "stop", ["empty"]),
    ("/v1/completions", {**C, "stop": ["a"] * 17}, "stop", ["at most 16"]),
    ("/v1/completions", {**C, "stop": "s" * 2000}, "stop", ["at most 1024"]),
    ("/v1/completions", {**C, "stop": [1, 2]}, "stop", []),
    ("/v1/completions", {**C, "stop_token_ids": [10**9]}, "stop_token_ids", ["vocabulary"]),
    ("/v1/completions", {**C, "stop_token_ids": [1] * 300}, "stop_token_ids", ["at most 256"]),
    ("/v1/completions", {**C, "stop_token_ids": "1"}, "stop_token_ids", []),
    ("/v1/completions", {**C, "ignore_eos": [1]}, "ignore_eos", []),
    ("/v1/completions", {**C, "user": "u" * 300}, "user", ["at most 256"]),
    ("/v1/completions", {**C, "presence_penalty": 1}, "presence_penalty", ["not supported"]),
    ("/v1/completions", {**C, "frequency_penalty": -1}, "frequency_penalty", ["not supported"]),
    ("/v1/completions", {**C, "logit_bias": {"1": 5}}, "logit_bias", ["not supported"]),
    ("/v1/completions", {**C, "logit_bias": {"1": "x"}}, "logit_bias", []),
    ("/v1/completions", {**C, "logprobs": 5}, "logprobs", ["only the sampled token"]),
    ("/v1/completions", {**C, "logprobs": -1}, "logprobs", ["greater than or equal to 0"]),
    ("/v1/completions", {**C, "echo": True}, "echo", ["not supported"]),
    ("/v1/completions", {**C, "best_of": 3}, "best_of", ["not supported"]),
    ("/v1/completions", {**C, "suffix": "end"}, "suffix", ["not supported"]),
    ("/v1/completions", {**C, "max_token": 3}, "max_token", ["unknown field"]),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", ["at least 1"]),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages", ["list"]),
    ("/v1/chat/completions", {**CHAT, "messages": MSG * 5000}, "messages", ["at most 4096"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, "messages[0].role", ["field required"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", []),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", []),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", []),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content", []),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "name": "n" * 300}]},
     "messages[0].name", ["at most 256"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "extra": 1}]},
     "messages[0].extra", ["unknown field"]),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 500}, "max_tokens", ["context length"]),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, "max_tokens", ["greater than or equal to 1"]),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 500}, "max_completion_tokens",
     ["context length"]),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", []),
    ("/v1/chat/completions", {**CHAT, "logprobs": "all"}, "logprobs", []),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs", ["only the sampled token"]),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format.type", []),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools", ["not supported"]),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice", ["not supported"]),
    ("/v1/chat/completions", {**CHAT, "parallel_tool_calls": "x"}, "parallel_tool_calls", []),
    ("/v1/chat/completions", {**CHAT, "add_generation_prompt": {}}, "add_generation_prompt", []),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", ["number"]),
    ("/v1/chat/completions", {**CHAT, "n": 1.5}, "n", []),
    ("/v1/chat/completions", {**CHAT, "seed": "1"}, "seed", []),
]


@pytest.mark.parametrize("path,body,field,words", FIELD_CASES,
                         ids=[f"{p.rsplit('/', 1)[1]}-{f}-{i}" for i, (p, _, f, _) in enumerate(FIELD_CASES)])
def test_each_bad_field_is_a_4xx_naming_it(server, path, body, field, words):
    r = post(server, path, body)
    assert_names(r, 404 if words == ["does not exist"] else 400, field, words)


# Bodies json.dumps cannot write: non-finite numbers, unpaired surrogates, raw bytes.
RAW_CASES = [
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', "top_p"),
    (b'{"model": "tiny", "prompt": "hi", "presence_penalty": -Infinity}', "presence_penalty"),
    (b'{"model": "tiny", "prompt": "hi", "seed": 1e400}', "seed"),
    (b'{"model": "tiny", "prompt": "\\ud800 hi"}', "prompt"),
    (b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt"),
    (b'{"model": "\\ud83d", "prompt": "hi"}', "model"),
    (b'{"model": "tiny", "prompt": "hi", "stop": "\\ud800"}', "stop"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}', "messages[0].name"),
]


@pytest.mark.parametrize("raw,field", RAW_CASES)
def test_malformed_strings_and_numbers_are_400_naming_the_field(server, raw, field):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    assert_names(post(server, path, content=raw), 400, field)


@pytest.mark.parametrize("raw,words", [
    (b'{"model": "tiny", "prompt": ', ["not valid JSON"]),
    (b"\xff\xfe\x00garbage", ["not valid JSON"]),
    (b'["model", "tiny"]', ["body"]),
    (b"", ["body"]),
    (b'{"model": "tiny", "prompt": "hi", "tools": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nested too deeply"]),
    (b"{" * 100_000, ["JSON"]),
])
def test_broken_and_deeply_nested_json_is_400(server, raw, words):
    r = post(server, "/v1/completions", content=raw)
    assert r.status_code == 400, r.text
    for w in words:
        assert w in r.json()["error"]["message"], r.text


def test_deep_but_parseable_nesting_in_a_free_form_field_is_400(server):
    nested = {}
    for _ in range(500):
        nested = {"a": nested}
    r = post(server, "/v1/chat/completions", {**CHAT, "tool_choice": nested})
    assert_names(r, 400, "tool_choice", ["not supported"])


def test_huge_bodies_are_413_whether_declared_or_chunked(server):
    big = json.dumps({**C, "prompt": "a" * (MAX_BODY_BYTES + 1)}).encode()
    r = post(server, "/v1/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    assert str(MAX_BODY_BYTES) in r.json()["error"]["message"]

    def chunks():   # no Content-Length: the limit counts what arrives
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + 1 << 20]
    r = post(server, "/v1/completions", content=chunks())
    assert r.status_code == 413, r.text[:300]
    # The server still serves afterwards.
    assert post(server, "/v1/completions", C).status_code == 200


def test_api_key_is_compared_with_hmac_compare_digest(monkeypatch):
    calls, compare = [], hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return compare(a, b)
    monkeypatch.setattr(auth.hmac, "compare_digest", recording)

    def scope(value: bytes):
        return {"headers": [(b"authorization", value)]}
    assert auth._authorized(scope(b"Bearer s3cr\xc3\xa9t"), "s3crét")
    assert not auth._authorized(scope(b"Bearer wrong"), "s3crét")
    assert not auth._authorized(scope(b"Basic s3cr\xc3\xa9t"), "s3crét")
    assert not auth._authorized({"headers": []}, "s3crét")
    # Every comparison of a presented key went through the constant-time compare.
    assert [a for a, _ in calls] == [b"s3cr\xc3\xa9t", b"wrong"]


def test_wrong_key_is_401_and_the_right_one_serves(server):
    r = post(server, "/v1/completions", C, headers={"Authorization": "Bearer " + KEY[:-1] + "x"})
    assert r.status_code == 401
    r = post(server, "/v1/completions", {**C, "prompt": f"{MARKER} once upon a time"})
    assert r.status_code == 200, r.text


def test_logs_hold_no_prompt_text_and_no_key(server):
    # Prompts that succeed, that fail validation and that fail in the engine, streamed and not.
    for body in ({**C, "prompt": f"{MARKER} a"}, {**C, "prompt": f"{MARKER} b", "stream": True},
                 {**C, "prompt": f"{MARKER} c", "temperature": 9},
                 {**C, "prompt": f"{MARKER} d " * 100}, {**CHAT, "messages": [{"role": "user", "content": MARKER}]}):
        assert post(server, "/v1/" + ("chat/completions" if "messages" in body else "completions"), body).status_code \
            in (200, 400)
    files = [server.log_path] + [p for p in Path(server.ray_logs).rglob("*") if p.is_file()]
    texts = {str(p): p.read_bytes().decode("utf-8", "replace") for p in files if p.stat().st_size < 200 << 20}
    assert any("raypp: serving tiny" in t for t in texts.values())   # the replica's log was read
    leaks = [p for p, t in texts.items() if MARKER in t or KEY in t]
    assert not leaks, leaks
