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
    assert [(r["batch"], r["mode"]) for r in result["decode"]] == [
        (1, "eager-torch"), (1, "eager-triton"), (2, "eager-torch"), (2, "eager-triton")]
    for r in result["decode"]:
        assert r["tokens_per_s"] > 0 and 0 < r["frac_of_roofline"]
    # fp32 on the CPU: the kernels and the references pick the same greedy tokens.
    by_batch = {}
    for r in result["decode"]:
        by_batch.setdefault(r["batch"], []).append(r["first_ids"])
    assert all(a == b for a, b in by_batch.values())
    # The engine path: StageWorker with graphs off and on (on the CPU both run eagerly).
    engine = result["engine"]
    assert [r["batch"] for r in engine["rows"]] == [1, 2] and engine["graphs_captured"] == []
    assert all(r["eager_step_ms"] > 0 and r["graph_step_ms"] > 0 and r["same_tokens"] for r in engine["rows"])
