"""Several replicas: each owns its pipeline (placement groups, process groups), and a worker
killed in one replica costs that replica a rebuild while every request still succeeds."""
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.failure_paths_helpers import live_groups, serving, stage_pids, wait_for
from tests.serve_helpers import app_args, load_deployment

pytestmark = pytest.mark.slow


def tiny_tp2_pp2(ckpt, **deployment) -> dict:
    config = load_deployment("tiny_cpu.yaml")
    app_args(config)["model"] = {"path": str(ckpt), "served_name": "tiny"}
    config["applications"][0]["deployments"][0].update(deployment)
    return config


def complete(base_url: str, i: int) -> int:
    r = httpx.post(f"{base_url}/v1/completions", timeout=300, json={
        "model": "tiny", "prompt": f"request {i}: once upon a time", "max_tokens": 24, "temperature": 0,
        "ignore_eos": True})
    return r.status_code


def test_two_replicas_serve_and_survive_a_killed_worker(tmp_path, tiny_ckpt):
    config = tiny_tp2_pp2(tiny_ckpt, num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    with serving(config, tmp_path, num_cpus=6) as server:
        wait_for(lambda: len(live_groups()) == 2, 120, "two replicas' placement groups")
        before = live_groups()
        assert all(len(g) == 2 for g in before.values()), before
        statuses: list[int] = []
        stop = threading.Event()

        def load(k):
            i = 0
            while not stop.is_set():
                statuses.append(complete(server.base_url, k * 1000 + i))
                i += 1
        threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(stage_pids()[0], signal.SIGKILL)

        def one_rebuilt() -> bool:   # new groups under a new name for one replica; the other keeps its own
            now = live_groups()
            return len(now) == 2 and len(set(now) & set(before)) == 1 and all(len(g) == 2 for g in now.values())
        wait_for(one_rebuilt, 180, "one replica rebuilt, the other untouched")
        time.sleep(3)   # requests on the rebuilt pipeline too
        stop.set()
        for t in threads:
            t.join(timeout=300)
        assert statuses and set(statuses) == {200}, statuses
        assert "rebuilt" in server.log_text()


def test_health_reads_rebuilding_while_a_stream_pauses_and_resumes(tmp_path, tiny_ckpt):
    config = tiny_tp2_pp2(tiny_ckpt)
    app_args(config)["parallel"].update(tp=1)
    with serving(config, tmp_path, num_cpus=4) as server:
        body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True}
        reference = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300).json()
        seen: list[str] = []
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True},
                          timeout=300) as r:
            text = ""
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                if len(text) > 20 and not seen:
                    os.kill(stage_pids()[0], signal.SIGKILL)
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and "rebuilding" not in seen:
                        h = httpx.get(f"{server.base_url}/health", timeout=10)
                        seen.append(h.json()["status"])
                        if h.status_code == 503:
                            assert h.headers["retry-after"] == "5"
                        time.sleep(0.05)
            assert text == reference["choices"][0]["text"]
        assert "rebuilding" in seen
        h = httpx.get(f"{server.base_url}/health", timeout=10).json()
        assert h["status"] == "ok" and h["rebuilds"] == 1
