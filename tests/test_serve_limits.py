"""Admission and deploy-time failures, over real HTTP, in one `serve run` holding three apps:

- /limits: a one-sequence engine (TP = PP = 1) with a one-request queue and an API key from
  RAYPP_API_KEY: 401 without/with a wrong key, 429 + Retry-After when the queue is full;
- /bad: args with a bad field: the deploy fails at once, naming the field and the reason;
- /big: deployments/70b_tp8_pp2.yaml as shipped (cuda, 2 x 8 GPUs) on this GPU-less
  machine: fails within its placement timeout, naming the shortfall.
"""
import asyncio
import time

import httpx
import pytest

from raypp.serve import protocol as P
from tests.serve_helpers import ServeRun, app_args, load_deployment

KEY = "test-key-123"
PLACEMENT_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    big = load_deployment("70b_tp8_pp2.yaml")
    big_args = app_args(big)
    big_args["model"]["path"] = str(tiny_ckpt)
    big_args["parallel"]["placement_timeout_s"] = PLACEMENT_TIMEOUT_S
    config = {"http_options": {"host": "127.0.0.1"}, "applications": [
        {"name": "limits", "route_prefix": "/limits", "import_path": "raypp.serve:build_app",
         "args": {"model": {"path": str(tiny_ckpt), "served_name": "tiny"},
                  "parallel": {"device": "cpu"},
                  "scheduler": {"max_num_seqs": 1, "max_queue": 1, "num_kv_blocks": 256}},
         "deployments": [{"name": "LLMServer", "ray_actor_options": {"num_cpus": 0.5}}]},
        {"name": "bad", "route_prefix": "/bad", "import_path": "raypp.serve:build_app",
         "args": {"model": {"path": str(tiny_ckpt)}, "parallel": {"tp": 0}, "scheduler": {"max_quue": 3}}},
        {**big["applications"][0], "name": "big", "route_prefix": "/big",
         "deployments": [{"name": "LLMServer", "ray_actor_options": {"num_cpus": 0.5}}]},
    ]}
    s = ServeRun(config, tmp_path_factory.mktemp("serve_limits"), env={"RAYPP_API_KEY": KEY})
    s.started = time.monotonic()
    s.start()
    try:
        s.wait_ready("/limits/health")
        yield s
    finally:
        s.stop()


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def _assert_openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = P.ErrorResponse.model_validate(r.json()).error
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and err.message
    if code:
        assert err.code == code
    return err


@pytest.mark.parametrize("headers", [{}, _auth("wrong"), {"Authorization": KEY}])
def test_missing_or_wrong_api_key_is_401(server, headers):
    for path in ("/limits/v1/models", "/limits/v1/completions"):
        r = httpx.post(server.base_url + path, json={"model": "tiny", "prompt": "x"}, headers=headers) \
            if path.endswith("completions") else httpx.get(server.base_url + path, headers=headers)
        err = _assert_openai_error(r, 401, "invalid_api_key")
        assert "API key" in err.message


def test_right_key_is_served_and_health_needs_none(server):
    assert httpx.get(server.base_url + "/limits/health").status_code == 200
    r = httpx.post(server.base_url + "/limits/v1/completions", headers=_auth(), timeout=60,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_full_queue_is_429_with_retry_after(server):
    async def one(c):
        return await c.post("/limits/v1/completions", headers=_auth(), json={
            "model": "tiny", "prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True})

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as c:
            return await asyncio.gather(*[one(c) for _ in range(6)])
    results = asyncio.run(main())
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    for r in results:
        if r.status_code == 429:
            _assert_openai_error(r, 429, "rate_limit_exceeded")
            assert int(r.headers["Retry-After"]) >= 1
    # The queue drains: the next request is served.
    r = httpx.post(server.base_url + "/limits/v1/completions", headers=_auth(), timeout=60,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_bad_field_fails_the_deploy_naming_field_and_reason(server):
    assert server.wait_for_log("args.parallel.tp: Input should be greater than or equal to 1 (got 0)", 60), \
        server.log_tail()
    log = server.log_text()
    assert "args.scheduler.max_quue: unknown field" in log
    assert httpx.get(server.base_url + "/bad/health").status_code == 404  # nothing was deployed


def test_70b_layout_without_16_gpus_fails_within_placement_timeout_naming_the_shortfall(server):
    assert server.wait_for_log(f"placement timed out after {PLACEMENT_TIMEOUT_S}s", 120), server.log_tail()
    log = server.log_text()
    assert "GPU=8" in log and "cannot place 2 stage(s) of 8 workers" in log
    # One attempt, not Serve's usual retries, each of which would wait the timeout again.
    time.sleep(2 * PLACEMENT_TIMEOUT_S)
    assert server.log_text().count("PlacementError: placement timed out") == 1, server.log_tail(80)
    assert httpx.get(server.base_url + "/big/health").status_code != 200
