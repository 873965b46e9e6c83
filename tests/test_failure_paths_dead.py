"""A replica whose engine is dead for good (parallel.max_rebuilds: 0), reached through the real
server: a worker killed mid-stream ends the stream with an in-band SSE error, new requests get
503 with Retry-After, `check_health` raises and Serve replaces the replica, which then serves;
a stopped worker (SIGSTOP) is found by the step timeout and fails the same clean way.  The
dead replica's workers and placement groups go with it.  Times are printed as `measured:`."""
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
    with serving(tiny_pp2(tiny_ckpt, max_rebuilds=0, step_timeout_s=STEP_TIMEOUT_S),
                 tmp_path_factory.mktemp("failure_dead")) as s:
        yield s


def ready(server) -> bool:
    try:
        if httpx.get(server.base_url + "/health", timeout=10).status_code != 200:
            return False
        return httpx.post(server.base_url + "/v1/completions", json={**BODY, "max_tokens": 2},
                          timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def fail_mid_stream(server, fault):
    """Streams; once text flows, `fault(pid)` on one stage worker.  Returns (events, seconds from the
    fault to the in-band error, the pid, the groups before)."""
    wait_for(lambda: ready(server) and len(stage_pids()) == 2, 240, "a serving replica with 2 workers")
    groups, hit = live_groups(), {}

    def on_text(text):
        if len(text) > 20 and not hit:
            hit["pid"] = stage_pids()[-1]
            fault(hit["pid"])
            hit["t"] = time.monotonic()
    _, events = stream_events(server.base_url, on_text)
    return events, time.monotonic() - hit["t"], hit["pid"], groups


def assert_dead_then_replaced(server, pid, groups_before, fault_at):
    err = None
    r = httpx.post(server.base_url + "/v1/completions", json=BODY, timeout=60)
    if r.status_code == 503:   # Serve had not yet replaced the dead replica (it takes ~30 s)
        err = r.json()["error"]
        assert err["code"] == "engine_dead" and int(r.headers["retry-after"]) >= 1, r.text
        assert httpx.get(server.base_url + "/health", timeout=10).json()["status"] == "dead"
    else:
        assert r.status_code == 200, r.text
    wait_for(lambda: ready(server), 300, "Serve's replacement replica serving")
    print(f"measured: fault -> replacement replica serving {time.monotonic() - fault_at:.1f}s")
    # The replacement has a pipeline of its own; the dead one's worker and groups are gone.
    after = wait_for(lambda: (g := live_groups()) and set(g).isdisjoint(groups_before) and len(g) == 1 and g,
                     120, "only the replacement's placement groups")
    assert sorted(next(iter(after.values()))) == ["0", "1"]
    wait_for(lambda: pid_gone(pid), 60, f"stage worker {pid} gone")
    assert "check_health" in server.log_text() or "unhealthy" in server.log_text().lower()
    return err


def test_killed_worker_ends_the_stream_in_band_then_503_then_serve_replaces_the_replica(server):
    t0 = time.monotonic()
    events, to_error, pid, groups = fail_mid_stream(server, lambda p: os.kill(p, signal.SIGKILL))
    fault_at = time.monotonic() - to_error
    print(f"measured: SIGKILL -> in-band stream error {to_error:.2f}s")
    assert any(isinstance(e, dict) and e.get("choices") for e in events)
    last = events[-1]
    assert isinstance(last, dict) and last["error"]["code"] == "engine_dead", events[-3:]
    assert last["error"]["type"] == "service_unavailable" and "[DONE]" not in events
    err = assert_dead_then_replaced(server, pid, groups, fault_at)
    assert err is None or "workers failed" in err["message"]
    assert time.monotonic() - t0 < 600


def test_stopped_worker_hits_the_step_timeout_and_fails_cleanly(server):
    stopped = []

    def stop(pid):
        stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)
    try:
        events, to_error, pid, groups = fail_mid_stream(server, stop)
        print(f"measured: SIGSTOP -> in-band stream error {to_error:.2f}s (step_timeout_s={STEP_TIMEOUT_S})")
        # Found by the step timeout, not sooner (nothing else can tell a stopped worker from a slow one).
        assert to_error >= STEP_TIMEOUT_S * 0.9
        last = events[-1]
        assert isinstance(last, dict) and last["error"]["code"] == "engine_dead", events[-3:]
        assert "step_timeout_s" in last["error"]["message"]
        assert_dead_then_replaced(server, pid, groups, time.monotonic() - to_error)
    finally:
        for pid in stopped:
            release(pid)
