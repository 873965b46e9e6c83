"""Several replicas: each owns its pipeline (placement groups, process groups), and a worker
killed in one replica costs that replica a rebuild while every request still succeeds."""
import json
import os
import signal
import threading
import time

import httpx
import pytest
import ray

from tests.monitoring_helpers import RayHead
from tests.serve_helpers import ServeRun, app_args, load_deployment

pytestmark = pytest.mark.slow


def groups_by_replica() -> dict[str, list]:
    """Live placement groups by their executor's name prefix (`raypp-<id>-stage<i>`)."""
    out: dict[str, list] = {}
    for g in ray.util.placement_group_table().values():
        if g["state"] != "REMOVED" and g["name"].startswith("raypp-"):
            out.setdefault(g["name"].rsplit("-stage", 1)[0], []).append(g)
    return out


def complete(base_url: str, i: int) -> int:
    r = httpx.post(f"{base_url}/v1/completions", timeout=300, json={
        "model": "tiny", "prompt": f"request {i}: once upon a time", "max_tokens": 24, "temperature": 0,
        "ignore_eos": True})
    return r.status_code


def test_two_replicas_serve_and_survive_a_killed_worker(tmp_path, tiny_ckpt):
    config = load_deployment("tiny_cpu.yaml")
    app = config["applications"][0]
    app_args(config)["model"] = {"path": str(tiny_ckpt), "served_name": "tiny"}
    app["deployments"][0].update(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    head = RayHead(tmp_path, num_cpus=6)
    try:
        head.start()
        with ServeRun(config, tmp_path / "serve", address=head.address, ready_timeout_s=300) as server:
            ray.init(address=head.address, log_to_driver=False)
            try:
                deadline = time.monotonic() + 120
                while len(groups := groups_by_replica()) < 2 and time.monotonic() < deadline:
                    time.sleep(1)
                assert len(groups) == 2 and all(len(g) == 2 for g in groups.values()), groups
                before = set(groups)
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
                pid = next(a["Pid"] for a in ray._private.state.actors().values()
                           if a["ActorClassName"] == "StageActor" and a["State"] == "ALIVE")
                os.kill(pid, signal.SIGKILL)
                # Its replica rebuilds (new groups under a new name); the other keeps its own.
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    now = groups_by_replica()
                    if len(now) == 2 and len(set(now) & before) == 1 and all(len(g) == 2 for g in now.values()):
                        break
                    time.sleep(1)
                time.sleep(3)   # requests on the rebuilt pipeline too
                stop.set()
                for t in threads:
                    t.join(timeout=300)
                after = groups_by_replica()
                assert len(after) == 2 and len(set(after) & before) == 1, (before, after)
                assert statuses and set(statuses) == {200}, statuses
                assert "rebuilt" in server.log_text()
            finally:
                ray.shutdown()
    finally:
        head.stop()


def test_health_reads_rebuilding_while_a_stream_pauses_and_resumes(tmp_path, tiny_ckpt):
    config = load_deployment("tiny_cpu.yaml")
    app_args(config)["model"] = {"path": str(tiny_ckpt), "served_name": "tiny"}
    app_args(config)["parallel"].update(tp=1)
    head = RayHead(tmp_path, num_cpus=4)
    try:
        head.start()
        with ServeRun(config, tmp_path / "serve", address=head.address, ready_timeout_s=300) as server:
            ray.init(address=head.address, log_to_driver=False)
            try:
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
                            pid = next(a["Pid"] for a in ray._private.state.actors().values()
                                       if a["ActorClassName"] == "StageActor" and a["State"] == "ALIVE")
                            os.kill(pid, signal.SIGKILL)
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
            finally:
                ray.shutdown()
    finally:
        head.stop()
