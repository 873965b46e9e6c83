"""Predictions against published measurements: each within 25%.

Sources (conditions per row in raypp/planner/calibration.py, table in docs/planner.md):
- NVIDIA TensorRT-LLM, docs/source/performance.md, "Performance of TensorRT-LLM" (peak-throughput tables of
  v0.6.1, first-token-latency tables of v0.5): Llama-2-7B/70B on H100 SXM (FP8, FP8 KV), L40S (FP8) and
  A100 80GB (FP16), static batches of the stated size, input/output lengths as listed.
  https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/performance.md
- NVIDIA NIM LLM benchmarking guide, "Performance": Llama-3.3-70B-Instruct, NIM 1.8.0, 2 x H100 80GB, FP8, TP2,
  concurrency 1, 5000/500 and 500/2000 input/output tokens (TTFT and ITL).
  https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance
"""
import pytest

from raypp.planner.calibration import MEASUREMENTS, errors, table


def test_at_least_eight_sourced_measurements():
    assert len(MEASUREMENTS) >= 8
    assert len({m.key for m in MEASUREMENTS}) == len(MEASUREMENTS)
    assert all(m.source.count("http") >= 1 for m in MEASUREMENTS)
    assert {m.metric for m in MEASUREMENTS} == {"ttft_ms", "itl_ms", "tok_s_per_gpu"}
    assert {m.gpu for m in MEASUREMENTS} >= {"h100-sxm", "a100-sxm-80gb", "l40s"}


@pytest.mark.parametrize("m,pred,err", errors(), ids=[m.key for m in MEASUREMENTS])
def test_prediction_within_25_percent(m, pred, err):
    assert abs(err) <= 0.25, f"{m.key}: predicted {pred:.1f}, measured {m.value} ({err:+.1%})"


def test_table_has_a_row_per_measurement():
    assert table().count("\n") == len(MEASUREMENTS) + 1
