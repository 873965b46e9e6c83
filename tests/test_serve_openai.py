"""End to end: `serve run deployments/tiny_cpu.yaml` (TP=2 x PP=2 on CPU) and the official
`openai` client, streaming and not, against the in-process engine's greedy tokens.

One `serve run` per module (its start costs ~40 s on 2 cores).  The file is run as it is
shipped, from an empty directory, with only the HTTP port changed: it must make the tiny
checkpoint itself under ./checkpoints/tiny, as it does for a user on a fresh machine.
"""
import asyncio
import json
import time

import httpx
import openai
import pytest

from raypp.config import DeploymentConfig
from raypp.model.sampling_params import SamplingParams
from raypp.runtime.engine import Engine
from raypp.serve import protocol as P
from tests.reference import collect
from tests.serve_helpers import ServeRun, load_deployment

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, my name is"]
CHATS = [[{"role": "user", "content": "Tell me a story."}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Ray?"}]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeRun(load_deployment("tiny_cpu.yaml"), tmp_path_factory.mktemp("serve_tiny_cpu")) as s:
        yield s


@pytest.fixture(scope="module")
def ckpt(server):
    return server.workdir / "checkpoints" / "tiny"


@pytest.fixture(scope="module")
def hf_tok(ckpt):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ckpt))


def _chat_ids(hf_tok, messages):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def reference(ckpt, hf_tok):
    """Greedy ids of the in-process engine (one process, no Ray), prompts tokenized by transformers."""
    engine = Engine.from_config(DeploymentConfig.model_validate(
        {"model": {"path": str(ckpt)}, "parallel": {"device": "cpu"}, "scheduler": {"num_kv_blocks": 256}}))
    prompts = {("text", p): hf_tok(p)["input_ids"] for p in PROMPTS}
    prompts.update({("chat", i): _chat_ids(hf_tok, m) for i, m in enumerate(CHATS)})

    async def main():
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        outs = await asyncio.gather(*[collect(engine, ids, params) for ids in prompts.values()])
        return dict(zip(prompts, outs))
    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    return {k: {"ids": v, "prompt_len": len(prompts[k]), "text": hf_tok.decode(v, skip_special_tokens=True),
                "finish": "length" if len(v) == MAX_TOKENS else "stop"} for k, v in outs.items()}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=300, max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completion_matches_in_process_engine(client, reference, prompt):
    ref = reference[("text", prompt)]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == ref["finish"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref["prompt_len"], len(ref["ids"]))


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_streamed_completion_matches_in_process_engine(client, reference, prompt):
    ref = reference[("text", prompt)]
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref["finish"]
    assert len(chunks) > 3  # token by token, not one lump
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref["ids"])


@pytest.mark.parametrize("i", range(len(CHATS)))
def test_chat_matches_in_process_engine_streamed_and_not(client, reference, i):
    ref = reference[("chat", i)]
    r = client.chat.completions.create(model="tiny", messages=CHATS[i], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == ref["text"] and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref["finish"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref["prompt_len"], len(ref["ids"]))
    chunks = list(client.chat.completions.create(model="tiny", messages=CHATS[i], max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == ref["finish"]


def test_raw_sse_framing(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    for e in events[:-1]:
        P.CompletionChunk.model_validate_json(e[len("data: "):])  # what the OpenAPI spec says


def test_32_concurrent_streams_are_complete_and_correct(aclient, reference):
    keys = [("text", p) for p in PROMPTS] + [("chat", i) for i in range(len(CHATS))]

    async def one(k):
        kw = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=0, stream=True)
        if k[0] == "text":
            stream = await aclient.completions.create(prompt=k[1], **kw)
            texts = [c.choices[0].text async for c in stream]
        else:
            stream = await aclient.chat.completions.create(messages=CHATS[k[1]], **kw)
            texts = [c.choices[0].delta.content or "" async for c in stream]
        return k, "".join(texts)

    async def main():
        return await asyncio.gather(*[one(keys[i % len(keys)]) for i in range(32)])
    t0 = time.monotonic()
    results = asyncio.run(main())
    assert len(results) == 32
    for k, text in results:
        assert text == reference[k]["text"], k
    assert time.monotonic() - t0 < 240


def test_client_disconnect_aborts_and_frees_blocks(server):
    stats = lambda: httpx.get(server.base_url + "/stats", timeout=10).json()  # noqa: E731
    body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # three events (each is a line and a blank)
        during = stats()
    assert got[0].startswith("data: ")
    assert during["running"] == 1 and during["kv_blocks_free"] < during["kv_blocks_total"]
    deadline = time.monotonic() + 2.0
    while True:
        s = stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
            break
        assert time.monotonic() < deadline, f"request still holds resources 2 s after disconnect: {s}"
        time.sleep(0.05)


def test_n_choices_stop_strings_and_stop_token_ids(client, reference, hf_tok):
    ref = reference[("text", PROMPTS[0])]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text == ref["text"] for c in r.choices)
    assert r.usage.prompt_tokens == ref["prompt_len"] and r.usage.completion_tokens == 3 * len(ref["ids"])
    # A stop string from the middle of the greedy text: the text ends right before it.
    stop = ref["text"][len(ref["text"]) // 2:][:3]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ref["text"][:ref["text"].find(stop)]
    # A stop token id: generation ends at (and counts) that token.
    k = 4
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"stop_token_ids": [ref["ids"][k]]})
    first = ref["ids"].index(ref["ids"][k])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == first + 1


def test_seeded_sampling_is_reproducible_and_logprobs_come_back(client):
    kw = dict(model="tiny", prompt="Once", max_tokens=8, temperature=1.0, top_p=0.9, seed=123,
              extra_body={"top_k": 50})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    r = client.chat.completions.create(model="tiny", messages=CHATS[0], max_tokens=4, temperature=0, logprobs=True)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and all(x.logprob <= 0 for x in lps)
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == 4


ERROR_CASES = [
    # (path, body or raw bytes, status, param, words the message must hold)
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None, ["not valid JSON"]),
    ("/v1/completions", {"prompt": "x"}, 400, "model", ["field required"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", ["integer"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temprature": 0}, 400, "temprature", ["unknown field"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", ["greater than 0"]),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 99999]}, 400, "prompt", ["99999", "vocabulary"]),
    ("/v1/completions", {"model": "tiny", "prompt": "hello world", "max_tokens": 2047}, 400, "max_tokens",
     ["2048", "2047", "context length"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 5000}, 400, "max_tokens", ["2048", "5000"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", ["at least 1"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools", ["not supported"]),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", ["gpt-4", "does not exist"]),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     ["gpt-4"]),
    ("/v1/nothing", {}, 404, None, ["no route"]),
]


@pytest.mark.parametrize("path,body,status,param,words", ERROR_CASES)
def test_errors_have_their_status_and_openai_shape(server, path, body, status, param, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.base_url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = P.ErrorResponse.model_validate(r.json()).error
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert err.param == param
    for w in words:
        assert w in err.message, err.message


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)


def test_openapi_spec_is_accurate(server):
    spec = httpx.get(server.base_url + "/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= set(paths)
    for p in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[p]["post"]["responses"]
        assert {"200", "400", "401", "404", "429"} <= set(responses) and "422" not in responses
        assert "text/event-stream" in responses["200"]["content"]
    schemas = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "CompletionChunk", "ChatCompletionChunk",
            "ErrorResponse"} <= set(schemas)
    assert "HTTPValidationError" not in schemas
    # Responses really have the documented shape.
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    P.ChatCompletionResponse.model_validate(r.json())
    P.ModelList.model_validate(httpx.get(server.base_url + "/v1/models").json())
    json.dumps(spec)
