"""Typed engine stats without a model: stage accounting, the bubble ratio, request latencies."""
import time
from dataclasses import asdict

import pytest

from raypp.model.sampling_params import SamplingParams
from raypp.runtime.outputs import RequestOutput
from raypp.runtime.request_stats import RequestTracker
from raypp.runtime.sequence import Sequence, Status
from raypp.runtime.stats import EngineStats, PipelineStats
from raypp.runtime.step import StepTiming


def timing(stage, start, end, idle=0.0, wait=0.0, token_wait=0.0, prep=0.0, comm=0.0):
    compute = (end - start) - wait - token_wait - prep - comm
    return StepTiming(stage, 0, start, end, idle_s=idle, wait_s=wait, token_wait_s=token_wait, prep_s=prep,
                      compute_s=compute, comm_s=comm)


def two_stage_m1(steps: int, t0: float, work: float = 0.01):
    """PP=2, one micro-batch: each stage computes `work` then idles while the other does."""
    out = []
    for k in range(steps):
        s0 = t0 + 2 * k * work
        out.append([timing(0, s0, s0 + work, idle=work if k else 0.0, prep=0.001, comm=0.002),
                    timing(1, s0 + work, s0 + 2 * work, idle=work if k else 0.0, comm=0.001)])
    return out


def test_busy_plus_bubble_tiles_each_stage_span_and_m1_reads_half():
    now = time.time()
    steps = two_stage_m1(200, now - 5.0)
    stats = PipelineStats(2)
    for timings in steps:
        stats.record(timings, 0.02)
    stages = stats.snapshot()
    for st in stages:
        span = steps[-1][st.stage].end - steps[0][st.stage].start
        assert st.busy_s + st.bubble_s == pytest.approx(span, rel=1e-6)  # epoch floats: ~1e-7 s each
        assert st.bubble_s == pytest.approx(st.idle_s + st.wait_prev_stage_s + st.wait_tokens_s)
        assert st.busy_s == pytest.approx(st.compute_s + st.comm_s)
        assert st.steps == 200
        assert st.bubble_ratio == pytest.approx(0.5, abs=0.01)
    assert stats.mean_step_time_s() == pytest.approx(0.02)
    assert stats.take_step_times() == [0.02] * 200 and stats.take_step_times() == []


def test_waits_are_kept_apart_and_the_window_forgets_old_steps():
    now = time.time()
    stats = PipelineStats(2, window_s=10.0)
    # An old step, all bubble, outside the window; then a recent one with no bubble at all.
    stats.record([timing(0, now - 30, now - 29, token_wait=1.0), timing(1, now - 30, now - 29, wait=1.0)], 1.0)
    stats.record([timing(0, now - 1, now, prep=0.1), timing(1, now - 1, now, comm=0.2)], 1.0)
    s0, s1 = stats.snapshot()
    assert (s0.wait_tokens_s, s0.wait_prev_stage_s, s0.idle_s) == (pytest.approx(1.0), 0.0, 0.0)
    assert (s1.wait_prev_stage_s, s1.wait_tokens_s) == (pytest.approx(1.0), 0.0)
    assert s0.bubble_s == pytest.approx(1.0) and s1.bubble_s == pytest.approx(1.0)
    assert s0.bubble_ratio == 0.0 and s1.bubble_ratio == 0.0


def test_engine_stats_round_trips_through_json():
    stats = PipelineStats(2)
    for timings in two_stage_m1(3, time.time() - 1):
        stats.record(timings, 0.02)
    tracker = RequestTracker()
    es = EngineStats(running=1, waiting=2, micro_batches_in_flight=1, micro_batches=2, kv_blocks_total=10,
                     kv_blocks_free=4, preemptions=3, tokens_generated=7, mean_step_time_s=0.02,
                     requests=tracker.totals(), stages=stats.snapshot())
    assert EngineStats.from_json(asdict(es)) == es
    assert es.kv_cache_usage == pytest.approx(0.6)


def test_request_tracker_times_queue_first_token_gaps_and_finish():
    tracker = RequestTracker()
    seq = Sequence("r", [1, 2, 3], SamplingParams(max_tokens=3), 0, frozenset())
    on_step_calls = PipelineStats(1, on_step=tracker.on_step)
    clock = tracker.start(seq)
    on_step_calls.record([], 0.01)               # still waiting: no queue time yet
    assert tracker.take().queue_s == []
    seq.status, seq.admitted_at = Status.RUNNING, time.perf_counter()   # what the scheduler does
    on_step_calls.record([], 0.01)
    clock.output(RequestOutput("r", 3, [5], [5]))
    time.sleep(0.01)
    clock.output(RequestOutput("r", 3, [5, 6, 7], [6, 7], finished=True, finish_reason="length"))
    clock.close()
    lat = tracker.take()
    assert len(lat.queue_s) == 1 and len(lat.ttft_s) == 1 and len(lat.e2e_s) == 1
    assert len(lat.itl_s) == 2 and lat.itl_s[0] == lat.itl_s[1] >= 0.005   # two tokens share one gap
    assert lat.e2e_s[0] >= lat.ttft_s[0] >= lat.queue_s[0]
    assert tracker.totals().prompt_tokens == 3 and tracker.totals().finished == (("length", 1),)
    assert tracker.take().e2e_s == []
