"""raypp.client against a live `serve run`: a tiny TP = PP = 1 engine that runs one sequence
and queues one more (so a third request is refused with 429), behind an API key.

Sync and async calls, streams that add up to the whole answer, typed stats, each typed
error carrying the server's message, and a call refused with 429 that its retry serves.
"""
import asyncio
import http.server
import json
import subprocess
import sys
import threading
import time

import pytest

import raypp.client.sync
from raypp.client import (APIConnectionError, APITimeoutError, AsyncClient, AuthenticationError, BadRequestError,
                          Client, NotFoundError, RateLimitError, ServerError)
from raypp.runtime.stats import EngineStats
from tests.serve_helpers import ServeRun

KEY = "client-test-key"
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    config = {"applications": [{
        "name": "raypp", "route_prefix": "/", "import_path": "raypp.serve:build_app",
        "args": {"model": {"path": str(tiny_ckpt), "served_name": "tiny"}, "parallel": {"device": "cpu"},
                 "scheduler": {"max_num_seqs": 1, "max_queue": 1, "num_kv_blocks": 256},
                 "serve": {"api_key": KEY}},
        "deployments": [{"name": "LLMServer", "ray_actor_options": {"num_cpus": 0.5}}]}]}
    with ServeRun(config, tmp_path_factory.mktemp("serve_client")) as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.base_url, api_key=KEY) as c:
        yield c


def test_import_pulls_neither_torch_nor_ray():
    code = "import sys, raypp.client; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_sync_calls_and_typed_stats(client):
    [model] = client.models()
    assert model.id == "tiny" and model.max_model_len > 0
    assert client.health().status == "ok"
    r = client.complete("Once upon a time", **GREEDY)
    assert r.object == "text_completion" and r.model == "tiny" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8 and r.text
    c = client.chat([{"role": "user", "content": "Hello!"}], **GREEDY, logprobs=True)
    assert c.object == "chat.completion" and c.usage.completion_tokens == 8 and c.text
    assert len(c.choices[0].logprobs) == 8 and all(lp.logprob <= 0 for lp in c.choices[0].logprobs)
    ids = client.complete([5, 6, 7], max_tokens=3, stop_token_ids=[], top_k=1)   # raypp's extension fields
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens <= 3
    stats = client.stats()
    assert isinstance(stats, EngineStats) and len(stats.stages) == 1
    st = stats.stages[0]
    assert st.steps >= 16 and st.busy_s > 0 and 0 <= st.bubble_ratio <= 1
    assert stats.tokens_generated >= 16


def test_streams_add_up_to_the_whole_answer(client):
    whole = client.complete("The quick brown fox", **GREEDY)
    chunks = list(client.complete("The quick brown fox", **GREEDY, stream=True))
    assert "".join(ch.text for ch in chunks) == whole.text
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = client.chat(messages, **GREEDY)
    streamed = list(client.chat(messages, **GREEDY, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in streamed)
    assert "".join(ch.text for ch in streamed) == chat.text


def test_async_client_matches_sync(client, server):
    sync_text = client.complete("In the beginning", **GREEDY).text
    messages = [{"role": "user", "content": "What is Ray?"}]
    sync_chat = client.chat(messages, **GREEDY).text

    async def main():
        async with AsyncClient(server.base_url + "/v1", api_key=KEY) as ac:   # an OpenAI-style URL works too
            whole, chat = await asyncio.gather(ac.complete("In the beginning", **GREEDY), ac.chat(messages, **GREEDY))
            pieces = [ch.text async for ch in await ac.chat(messages, **GREEDY, stream=True)]
            return whole.text, chat.text, "".join(pieces), (await ac.stats()).stages[0].steps, (await ac.health())

    whole, chat, streamed, steps, health = asyncio.run(main())
    assert whole == sync_text and chat == sync_chat == streamed
    assert steps > 0 and health.model == "tiny"


def test_api_key_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("RAYPP_API_KEY", KEY)
    with Client(server.base_url) as c:
        assert c.complete("Hi", max_tokens=2).usage.completion_tokens <= 2
    monkeypatch.delenv("RAYPP_API_KEY")
    with Client(server.base_url) as c, pytest.raises(AuthenticationError) as e:
        c.models()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and "API key" in str(e.value)


@pytest.mark.parametrize("call, error, status, says", [
    (lambda c: c.complete("Hi", max_tokens=2, frequency_penaltyy=1), BadRequestError, 400, "frequency_penaltyy"),
    (lambda c: c.complete("Hi", max_tokens=10**6), BadRequestError, 400, "1000000"),
    (lambda c: c.chat([{"role": "user", "content": "Hi"}], model="nope"), NotFoundError, 404, "`nope`"),
    (lambda c: Client(c.base_url, api_key="wrong").models(), AuthenticationError, 401, "API key"),
])
def test_each_error_is_typed_and_carries_the_servers_message(client, call, error, status, says):
    with pytest.raises(error) as e:
        call(client)
    assert e.value.status_code == status and says in e.value.message and says in str(e.value)


def _fill_the_queue(server) -> threading.Thread:
    """One long request running and one waiting: the engine's queue (max_queue 1) is full."""
    def long_requests():
        async def main():
            async with AsyncClient(server.base_url, api_key=KEY, max_retries=0) as ac:
                await asyncio.gather(*[ac.complete("Tell me a long story", max_tokens=300, ignore_eos=True)
                                       for _ in range(2)])
        asyncio.run(main())

    t = threading.Thread(target=long_requests)
    t.start()
    with Client(server.base_url, api_key=KEY) as c:
        deadline = time.monotonic() + 30
        while (s := c.stats()).running + s.waiting < 2:
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
    return t


def test_429_is_a_rate_limit_error_and_a_retry_then_succeeds(server, monkeypatch):
    t = _fill_the_queue(server)
    try:
        with Client(server.base_url, api_key=KEY, max_retries=0) as c, pytest.raises(RateLimitError) as e:
            c.complete("Hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.retry_after_s >= 1 and "retry" in e.value.message

        waits = []
        real_sleep = time.sleep
        monkeypatch.setattr(raypp.client.sync.time, "sleep", lambda s: (waits.append(s), real_sleep(s)))
        with Client(server.base_url, api_key=KEY, max_retries=30) as c:
            r = c.complete("Hi", max_tokens=2, ignore_eos=True)
        assert r.usage.completion_tokens == 2
        assert waits and all(w >= 1 for w in waits)   # each wait is the server's Retry-After
    finally:
        t.join(timeout=120)


def test_no_server_is_a_connection_error():
    with Client("http://127.0.0.1:9", max_retries=1) as c, pytest.raises(APIConnectionError) as e:
        c.health()
    assert "http://127.0.0.1:9/health" in str(e.value)


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """What a replica whose workers died answers (raypp's 503), `fail` times, then a completion;
    the prompt "slow" is answered after the client's timeout.  No live server can be made to answer 503 on cue."""
    fail = 0
    body = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
                       "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    def do_POST(self):
        if json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"] == "slow":
            time.sleep(1.0)
        if type(self).fail > 0:
            type(self).fail -= 1
            status, body = 503, json.dumps({"error": {"message": "the engine's workers died", "type":
                                                      "service_unavailable", "param": None, "code": None}}).encode()
        else:
            status, body = 200, self.body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def unavailable():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_503_is_a_server_error_retried_after_retry_after(unavailable):
    _Unavailable.fail = 2
    with Client(unavailable, max_retries=1, model="tiny") as c, pytest.raises(ServerError) as e:
        c.complete("x")
    assert e.value.status_code == 503 and e.value.message == "the engine's workers died"
    _Unavailable.fail = 2
    with Client(unavailable, max_retries=2, model="tiny") as c:
        assert c.complete("x").text == "ok" and _Unavailable.fail == 0


def test_a_slow_answer_is_a_timeout(unavailable):
    with Client(unavailable, timeout=0.2, model="tiny") as c, pytest.raises(APITimeoutError) as e:
        c.complete("slow")
    assert "within the timeout" in str(e.value)
