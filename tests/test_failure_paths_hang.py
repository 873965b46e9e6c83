"""A hung worker (SIGSTOP) through the real server, with a rebuild left: the step timeout finds
it, the replica rebuilds its pipeline, and the stream in flight pauses and then continues with
exactly the text of an undisturbed run; the stopped process is gone afterwards.  (With no
rebuild left it fails cleanly instead: tests/test_failure_paths_dead.py.)"""
import os
import signal
import time

import httpx
import pytest

from tests.failure_paths_helpers import (BODY, live_groups, pid_gone, ray_head, release, stage_pids,
                                         stream_events, tiny_pp2, wait_for)
from tests.serve_helpers import ServeRun

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 5


def test_stopped_worker_hits_the_step_timeout_and_the_stream_resumes_unchanged(tiny_ckpt, tmp_path):
    config = tiny_pp2(tiny_ckpt, max_rebuilds=1, step_timeout_s=STEP_TIMEOUT_S)
    stopped: list[int] = []
    with ray_head(tmp_path) as head, ServeRun(config, tmp_path / "serve", address=head.address) as server:
        try:
            reference = httpx.post(server.base_url + "/v1/completions", json=BODY, timeout=300).json()
            groups_before = live_groups()
            arrivals: list[float] = []

            def on_text(text):
                arrivals.append(time.monotonic())
                if len(text) > 20 and not stopped:
                    stopped.append(stage_pids()[-1])
                    os.kill(stopped[0], signal.SIGSTOP)
                    arrivals.append(time.monotonic())   # the pause is measured from the stop
            text, events = stream_events(server.base_url, on_text)
            pause = max(b - a for a, b in zip(arrivals, arrivals[1:]))
            print(f"measured: SIGSTOP -> stream resumes after {pause:.1f}s (step_timeout_s={STEP_TIMEOUT_S})")
            assert text == reference["choices"][0]["text"]
            assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
            assert pause >= STEP_TIMEOUT_S * 0.9
            health = httpx.get(server.base_url + "/health", timeout=10).json()
            assert health["status"] == "ok" and health["rebuilds"] == 1
            # The rebuilt pipeline has new groups; the stopped worker was killed with the old ones.
            after = live_groups()
            assert len(after) == 1 and set(after).isdisjoint(groups_before), (groups_before, after)
            wait_for(lambda: pid_gone(stopped[0]), 60, f"stopped worker {stopped[0]} gone")
            assert "no step came back" in server.log_text()
        finally:
            for pid in stopped:
                release(pid)
