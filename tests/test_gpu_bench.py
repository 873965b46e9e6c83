"""benchmarks/gpu_decode.py's CPU dry run: the GPU measurement script runs end to end."""
import json
import sys
from pathlib import Path

import pytest
import torch

import kernels

if not kernels.HAS_TRITON:
    pytest.skip("the benchmark times Triton kernels; pip install -e '.[dev]' brings triton", allow_module_level=True)
if not torch.cuda.is_available() and not kernels.INTERPRETED:
    pytest.skip("triton was imported before kernels/ could switch on its interpreter; "
                "run with TRITON_INTERPRET=1", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_gpu_decode_dry_run(tmp_path):
    import gpu_decode

    out = tmp_path / "dry.json"
    assert gpu_decode.main(["--dry-run", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["copy_gbps"] > 0
    assert {r["kernel"] for r in result["kernels"]} == {
        "rms_norm", "add_rms_norm", "silu_and_mul", "rope_and_cache", "gemv", "paged_decode_attention"}
    assert all(r["triton_gbps"] > 0 and r["torch_gbps"] > 0 for r in result["kernels"])
    assert [r["triton_us"] > 0 for r in result["attention_backends"]] == [True]
    assert [(r["batch"], r["mode"]) for r in result["decode"]] == [
        (1, "eager-triton"), (1, "graph"), (1, "graph-unfused"), (2, "eager-triton")]
    for r in result["decode"]:
        assert r["tokens_per_s"] > 0 and 0 < r["frac_of_roofline"]
    # On the CPU a DecodeGraph runs its forward eagerly: batch 1 the fused one (fused_decode.py).
    assert [r.get("fused") for r in result["decode"]] == [None, True, False, None]
    # fp32 on the CPU: every way of running the model picks the same greedy tokens.
    by_batch = {}
    for r in result["decode"]:
        by_batch.setdefault(r["batch"], []).append(r["first_ids"])
    assert all(a == b for ids in by_batch.values() for a, b in zip(ids, ids[1:]))
    # Each fused product tuned; the graph-vs-eager check ran its replays against both eager steps.
    assert [r["product"] for r in result["fused_tuning"]] == ["qkv", "o", "gate_up", "lm_head"]
    assert all(r["best_us"] <= r["default_us"] for r in result["fused_tuning"])
    check = result["graph_vs_eager"]
    assert [(r["batch"], r["fused"]) for r in check] == [(1, True), (2, False)]
    assert all(r["replay_equals_eager_with_graph_splits"] and r["max_rel_logit_diff_vs_eager"] < 1e-4
               for r in check)
    # The engine path: StageWorker with graphs off and on (on the CPU both run eagerly).
    engine = result["engine"]
    assert [r["batch"] for r in engine["rows"]] == [1, 2] and engine["graphs_captured"] == []
    assert all(r["eager_step_ms"] > 0 and r["graph_step_ms"] > 0 and r["same_tokens"] for r in engine["rows"])
