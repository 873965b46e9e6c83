"""A hung worker (SIGSTOP) through the real server, with rebuilds left.  Mid-stream, the step
timeout finds it: the replica rebuilds its pipeline and the stream pauses, then continues with
exactly the text of an undisturbed run.  While idle, Serve's health check pings the workers and
the ping's timeout finds it: the replica rebuilds before any request suffers.  Either way the
stopped process goes with the old pipeline.  (With no rebuild left a hung worker fails cleanly
instead: tests/test_failure_paths_dead.py.)"""
import os
import signal
import time

import httpx
import pytest

from tests.failure_paths_helpers import (BODY, live_groups, pid_gone, release, serving, stage_pids,
                                         stream_events, tiny_pp2, wait_for)

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with serving(tiny_pp2(tiny_ckpt, max_rebuilds=2, step_timeout_s=STEP_TIMEOUT_S),
                 tmp_path_factory.mktemp("failure_hang")) as s:
        yield s


@pytest.fixture
def stopped():
    pids: list[int] = []
    yield pids
    for pid in pids:
        release(pid)


def health(server) -> dict:
    return httpx.get(server.base_url + "/health", timeout=10).json()


def assert_rebuilt_without(server, pid, groups_before, rebuilds):
    h = wait_for(lambda: (h := health(server))["status"] == "ok" and h["rebuilds"] == rebuilds and h,
                 120, f"rebuild {rebuilds} done")
    assert h["rebuilds"] == rebuilds
    # The rebuilt pipeline has new groups; the stopped worker was killed with the old ones.
    after = live_groups()
    assert len(after) == 1 and set(after).isdisjoint(groups_before), (groups_before, after)
    wait_for(lambda: pid_gone(pid), 60, f"stopped worker {pid} gone")


def test_stopped_worker_hits_the_step_timeout_and_the_stream_resumes_unchanged(server, stopped):
    reference = httpx.post(server.base_url + "/v1/completions", json=BODY, timeout=300).json()
    groups_before, rebuilds = live_groups(), health(server)["rebuilds"]
    arrivals: list[float] = []

    def on_text(text):
        arrivals.append(time.monotonic())
        if len(text) > 20 and not stopped:
            stopped.append(stage_pids()[-1])
            os.kill(stopped[0], signal.SIGSTOP)
            arrivals.append(time.monotonic())   # the pause is measured from the stop
    text, events = stream_events(server.base_url, on_text)
    pause = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    print(f"measured: SIGSTOP mid-stream -> stream resumes after {pause:.1f}s (step_timeout_s={STEP_TIMEOUT_S})")
    assert text == reference["choices"][0]["text"]
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
    assert pause >= STEP_TIMEOUT_S * 0.9
    assert_rebuilt_without(server, stopped[0], groups_before, rebuilds + 1)
    assert "no step came back" in server.log_text()


def test_idle_stopped_worker_fails_the_health_ping_and_is_rebuilt(server, stopped):
    wait_for(lambda: health(server)["status"] == "ok" and len(stage_pids()) == 2, 120, "an idle, healthy replica")
    groups_before, rebuilds = live_groups(), health(server)["rebuilds"]
    stopped.append(stage_pids()[-1])
    t0 = time.monotonic()
    os.kill(stopped[0], signal.SIGSTOP)
    # Serve's health check runs every 10 s and the ping waits 10 s: well within 2 minutes.
    assert_rebuilt_without(server, stopped[0], groups_before, rebuilds + 1)
    print(f"measured: SIGSTOP while idle -> rebuilt by the health ping {time.monotonic() - t0:.1f}s")
    r = httpx.post(server.base_url + "/v1/completions", json={**BODY, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text
