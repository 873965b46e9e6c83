"""The step-time terms of the performance model, against the CPU measurements they come from,
and the shipped CPU factors against the fit of raypp's recorded runs.

Numbers: benchmarks/results/pipeline_fill_onednn.json (decode step T(b) of `small` in process, one
thread, products through oneDNN: T(8) 20.8, T(16) 29.1, T(32) 48.2 ms), ray_call_cost.json (steps
over the step socket), planner_vs_measured.json (the calibration phases the shipped factors are
fitted to).
"""
from dataclasses import fields, replace

import pytest

from raypp.layout import Layout
from raypp.planner.cpu_fit import fit_record
from raypp.planner.hardware import CPU_PROBED, DEVICES, LINKS
from raypp.planner.layout import Cluster, Workload, stage_shapes
from raypp.planner.models import PRESETS
from raypp.planner.perf import decode_round, roofline, stage_forward

SMALL = PRESETS["small"]
CPU = DEVICES["cpu-epyc-2core"]
WL = Workload(dtype="fp32", kv_dtype="fp32", input_len=128, output_len=64)


def cpu(workers: int, **eff) -> Cluster:
    d = replace(CPU, efficiency=replace(CPU.efficiency, **eff))
    return Cluster(d, workers, 1, LINKS[d.intra_link], LINKS[d.network])


def step_ms(batch: int, **eff) -> float:
    lay = Layout(1, 1, (SMALL.layers,))
    (shape,) = stage_shapes(SMALL, lay, WL)
    return 1e3 * stage_forward(shape, 0, lay, cpu(1, **eff), WL, batch, 1, 160, False).compute


def test_roofline_overlap_runs_from_max_to_sum():
    assert roofline(3.0, 1.0, 1.0) == 3.0
    assert roofline(3.0, 1.0, 0.0) == 4.0
    assert roofline(1.0, 3.0, 0.5) == 3.5


def test_cpu_decode_step_is_weights_plus_flops_not_their_max():
    # measured: T(32) / T(8) = 2.31, T(16) / T(8) = 1.40; a max() roofline keeps T(8) and T(16) at the
    # weights' time until the FLOPs pass the weight reading, then grows in proportion to the batch
    measured = {32: 48.2, 16: 29.1, 8: 20.8}
    # in process: the forward alone, without the serving loop's per-step cost around it
    cat = {b: step_ms(b, step_overhead=0.0) for b in measured}
    assert cat[32] / cat[8] == pytest.approx(measured[32] / measured[8], rel=0.15)
    assert cat[16] / cat[8] == pytest.approx(measured[16] / measured[8], rel=0.15)
    assert all(v == pytest.approx(measured[b], rel=0.2) for b, v in cat.items())
    as_max = {b: step_ms(b, overlap=1.0, step_overhead=0.0) for b in measured}   # max() instead of the sum
    worst = lambda pred: max(abs(pred[b] / v - 1) for b, v in measured.items())
    assert worst(as_max) > worst(cat) + 0.15


def test_shipped_cpu_factors_are_the_fit_of_the_recorded_runs():
    # the catalog's cpu-epyc-2core factors are what live_fit makes of the calibration phases recorded
    # by benchmarks/planner_vs_measured.py, starting from what cpu_probe measured -- not typed in
    got, shipped = fit_record(), CPU.efficiency
    for f in fields(shipped):
        assert getattr(shipped, f.name) == pytest.approx(getattr(got, f.name), rel=1e-3), f.name
    # what the fit may not move: the step's shape and the host, measured before any deployment
    for name in ("overlap", "pack_passes", "host_cores"):
        assert getattr(shipped, name) == getattr(CPU_PROBED, name)


def test_one_row_streams_weights_once_several_rows_add_the_packing_passes():
    # a BLAS that packs weights on every call (pack_passes 1) pays one more pass over them from two rows
    # on; one row never does.  raypp's products read weights packed at load time: the profile has none.
    (shape,) = stage_shapes(SMALL, Layout(1, 1, (SMALL.layers,)), WL)
    weights_ms = 1e3 * shape.stream_bytes / (CPU.bandwidth * CPU.efficiency.bw)
    assert step_ms(2, pack_passes=1.0) - step_ms(2, pack_passes=0.0) == pytest.approx(weights_ms, rel=0.01)
    assert step_ms(1, pack_passes=0.0) == step_ms(1, pack_passes=2.0)
    assert CPU.efficiency.pack_passes == 0.0


def test_every_micro_batch_reads_the_stage_weights_again():
    # PP2 at 32 sequences: m micro-batches of 32/m cost each stage m weight passes per round, so
    # more micro-batches buy less than the bubble they remove.  Measured (pipeline_fill_onednn.json,
    # steady decode against PP=1): m=2 1.19x, m=3 0.97x -- m=2 best, m=3 below it, neither near 2x.
    lay = Layout(1, 2, (4, 4))
    shapes = stage_shapes(SMALL, lay, WL)
    rounds = {m: decode_round(shapes, lay, cpu(2), WL, 32, m, 160)[0] for m in (1, 2, 3)}
    assert rounds[2] < rounds[3] and rounds[2] < rounds[1]
    assert rounds[1] / rounds[2] < 1.6
    # two micro-batches of 16 cost stage 0 one more weight pass (and per-forward costs) than one of 32
    fwd = {m: decode_round(shapes, lay, cpu(2, host_streams=0.0), WL, 32, m, 160)[2][0].compute for m in (1, 2)}
    eff = CPU.efficiency
    weights = shapes[0].stream_bytes / (CPU.bandwidth * eff.bw)
    per_forward = shapes[0].layers * eff.layer_overhead_decode + eff.step_overhead
    assert 2 * fwd[2] - fwd[1] == pytest.approx(weights + per_forward, rel=0.01)


def test_hop_cost_shows_in_the_round_when_the_pipeline_is_just_full():
    lay = Layout(1, 2, (4, 4))
    shapes = stage_shapes(SMALL, lay, WL)
    base = decode_round(shapes, lay, cpu(2, hop_overhead=0.0), WL, 32, 2, 160)[0]
    slow = decode_round(shapes, lay, cpu(2, hop_overhead=5e-3), WL, 32, 2, 160)[0]
    assert slow - base == pytest.approx(2 * 5e-3, rel=0.25)          # p hops per micro-batch cycle
    one = Layout(1, 1, (8,))
    (flat,) = stage_shapes(SMALL, one, WL)
    r0 = decode_round([flat], one, cpu(1, hop_overhead=0.0), WL, 32, 1, 160)[0]
    assert decode_round([flat], one, cpu(1, hop_overhead=5e-3), WL, 32, 1, 160)[0] == r0   # PP1: no hop


def test_the_per_call_cost_is_paid_per_stage_and_counted_idle():
    lay = Layout(1, 2, (4, 4))
    shapes = stage_shapes(SMALL, lay, WL)
    r0, b0, _ = decode_round(shapes, lay, cpu(2, call_overhead=0.0), WL, 32, 2, 160)
    r1, b1, _ = decode_round(shapes, lay, cpu(2, call_overhead=2e-3), WL, 32, 2, 160)
    assert r1 - r0 == pytest.approx(2 * 2e-3, rel=0.05)               # m forwards of the slowest stage
    assert b1 > b0


def test_workers_sharing_a_memory_bus_stream_slower_together():
    lay = Layout(1, 2, (4, 4))
    shapes = stage_shapes(SMALL, lay, WL)
    alone = decode_round(shapes, lay, cpu(2, host_streams=1.0), WL, 32, 1, 160)[0]
    free = decode_round(shapes, lay, cpu(2, host_streams=0.0), WL, 32, 2, 160)[0]
    shared = decode_round(shapes, lay, cpu(2, host_streams=1.0), WL, 32, 2, 160)[0]
    assert alone == decode_round(shapes, lay, cpu(2, host_streams=0.0), WL, 32, 1, 160)[0]
    assert shared > 1.2 * free


def test_more_workers_than_cores_are_time_sliced():
    # TP2 x PP2 on the 2-core host: with one micro-batch two workers compute at once, with two all four
    # do and each forward takes twice as long; a host with a core per worker does not slow down
    lay = Layout(2, 2, (4, 4))
    shapes = stage_shapes(SMALL, lay, WL)
    ample = cpu(4, host_cores=0, host_streams=0.0)
    two = cpu(4, host_cores=2, host_streams=0.0)
    one_mb = [stage_forward(sh, s, lay, two, WL, 8, 1, 160, False, 1) for s, sh in enumerate(shapes)]
    assert one_mb == [stage_forward(sh, s, lay, ample, WL, 8, 1, 160, False, 1) for s, sh in enumerate(shapes)]
    sliced = stage_forward(shapes[1], 1, lay, two, WL, 8, 1, 160, False, 2)
    free = stage_forward(shapes[1], 1, lay, ample, WL, 8, 1, 160, False, 2)
    assert sliced.compute == pytest.approx(2 * free.compute) and sliced.all_reduce == pytest.approx(2 * free.all_reduce)
