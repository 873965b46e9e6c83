"""What the failure-path tests share: a tiny PP=2 deployment on a private Ray head, the stage
workers' PIDs and placement groups as Ray reports them, and a streamed completion read event
by event (so a test can act mid-stream and see an in-band error)."""
from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager

import httpx
import ray

from tests.monitoring_helpers import RayHead
from tests.serve_helpers import ServeRun


def tiny_pp2(ckpt, **parallel) -> dict:
    """tp=1 x pp=2 on CPU: two stage workers, the smallest pipeline with a later stage."""
    return {"http_options": {"host": "127.0.0.1"}, "applications": [{
        "name": "raypp", "route_prefix": "/", "import_path": "raypp.serve:build_app",
        "args": {"model": {"path": str(ckpt), "served_name": "tiny"},
                 "parallel": {"tp": 1, "pp": 2, "device": "cpu", "cpus_per_worker": 0.25,
                              "placement_timeout_s": 60, **parallel},
                 "scheduler": {"max_num_seqs": 8, "max_queue": 16}},
        "deployments": [{"name": "LLMServer", "ray_actor_options": {"num_cpus": 0.5}}]}]}


@contextmanager
def ray_head(workdir, num_cpus: int = 3):
    """A private Ray head, with this process connected to it (to find and signal workers)."""
    head = RayHead(workdir, num_cpus=num_cpus)
    head.start()
    try:
        ray.init(address=head.address, log_to_driver=False)
        try:
            yield head
        finally:
            ray.shutdown()
    finally:
        head.stop()


@contextmanager
def serving(config: dict, workdir, num_cpus: int = 3):
    """`serve run` of `config` on a private Ray head, this process connected to it."""
    with ray_head(workdir, num_cpus) as head, ServeRun(config, workdir / "serve", address=head.address) as server:
        yield server


def stage_pids() -> list[int]:
    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "StageActor" and a["State"] == "ALIVE"]


def live_groups() -> dict[str, list[str]]:
    """raypp's placement groups not yet removed, by executor (`raypp-<id>-stage<i>`)."""
    out: dict[str, list[str]] = {}
    for g in ray.util.placement_group_table().values():
        if g["state"] != "REMOVED" and g["name"].startswith("raypp-"):
            prefix, _, stage = g["name"].rpartition("-stage")
            out.setdefault(prefix, []).append(stage)
    return out


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s:g}s: {what}")


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:   # reaped between the two looks
        return True


def release(pid: int) -> None:
    """A test's last word on a process it stopped: nothing is left stopped on a shared machine."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


BODY = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 300, "temperature": 0, "ignore_eos": True}


def stream_events(base_url: str, on_text, body: dict = BODY, timeout_s: float = 300):
    """Streams a completion; `on_text(text so far)` after each text event.  Returns (text, events),
    events being every `data:` payload in order ('[DONE]' or the parsed JSON)."""
    text, events = "", []
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=timeout_s) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if isinstance(events[-1], dict) and events[-1].get("choices"):
                text += events[-1]["choices"][0]["text"]
                on_text(text)
    return text, events
