"""Predictions against published measurements: the calibration set (fitted), the held-out set
(never fitted) and the TP-vs-PP claims raypp's advice rests on.

Sources (conditions per row in raypp/planner/measurements.py, tables in docs/planner.md):
- NVIDIA TensorRT-LLM, docs/source/performance.md, "Performance of TensorRT-LLM" (v0.6.1 peak throughput,
  v0.5 first-token latency and L40S tables): Llama-2-7B/70B on H100 SXM (FP8), L40S (FP8), A100 80GB (FP16).
  https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/performance.md
- NVIDIA NIM LLM benchmarking guide, "Performance": Llama-3.3-70B-Instruct, NIM 1.8.0, 2 x H100 80GB, FP8 TP2,
  concurrency 1 (calibration) and 5 / 25 / 50 (held out). https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance
- NVIDIA Technical Blog, "Boosting Llama 3.1 405B Throughput by Another 1.5x on NVIDIA H200 Tensor Core GPUs and
  NVLink Switch" (2024): 8 x H200, TP8 vs PP8 -- PP 1.5x the maximum throughput, TP 5.6x lower minimum latency.
"""
import statistics

import pytest

from raypp.planner.calibration import claim_ratio, errors, fit, table
from raypp.planner.hardware import DEVICES, Efficiency
from raypp.planner.measurements import CALIBRATION, CLAIMS, HELD_OUT, LEFT_OUT

CAL = errors(CALIBRATION)
HELD = errors(HELD_OUT)


def test_sets_are_sourced_and_disjoint():
    keys = [m.key for m in CALIBRATION + HELD_OUT + LEFT_OUT]
    assert len(keys) == len(set(keys))
    # disjoint in substance too, not just in name: no held-out row repeats a calibration condition
    cond = lambda m: (m.model, m.gpu, m.tp, m.pp, m.dtype, m.metric, m.batch, m.input_len, m.output_len)
    assert not {cond(m) for m in CALIBRATION} & {cond(m) for m in HELD_OUT}
    assert len(HELD_OUT) >= 6
    assert all("http" in m.source for m in CALIBRATION + HELD_OUT)
    assert {m.metric for m in CALIBRATION} == {"ttft_ms", "itl_ms", "tok_s_per_gpu"}
    assert {m.gpu for m in CALIBRATION} >= {"h100-sxm", "a100-sxm-80gb", "l40s"}


@pytest.mark.parametrize("m,pred,err", CAL, ids=[m.key for m in CALIBRATION])
def test_calibration_point_within_15_percent(m, pred, err):
    assert abs(err) <= 0.15, f"{m.key}: predicted {pred:.1f}, measured {m.value} ({err:+.1%}); {m.source}"


@pytest.mark.parametrize("m,pred,err", HELD, ids=[m.key for m in HELD_OUT])
def test_held_out_point_within_30_percent(m, pred, err):
    assert abs(err) <= 0.30, f"{m.key}: predicted {pred:.1f}, measured {m.value} ({err:+.1%}); {m.source}"


def test_held_out_median_within_15_percent():
    assert statistics.median(abs(e) for *_, e in HELD) <= 0.15


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.key for c in CLAIMS])
def test_tp_vs_pp_claims_on_the_right_side_and_within_25_percent(claim):
    ratio = claim_ratio(claim)
    assert ratio > 1.0, f"{claim.key}: predicted {ratio:.2f}x, the wrong side of 1 ({claim.source})"
    assert abs(ratio / claim.measured - 1) <= 0.25, f"{claim.key}: predicted {ratio:.2f}x vs {claim.measured}x"


def test_shipped_factors_are_the_fit_of_the_calibration_set():
    fitted = fit(CALIBRATION)
    assert fitted == Efficiency()
    assert all(d.efficiency == fitted for d in DEVICES.values() if d.kind == "gpu")


def test_table_has_a_row_per_measurement():
    assert table(CALIBRATION).count("\n") == len(CALIBRATION) + 1
    assert table(HELD_OUT).count("\n") == len(HELD_OUT) + 1
