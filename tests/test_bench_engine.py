"""`raypp bench engine` runs end to end on the tiny checkpoint (TP = PP = 1, in-process) and writes
valid JSON (+ a PNG); a bad --model is a one-line user error."""
import json

import pytest

from raypp.cli import main


def test_bench_tiny_writes_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = main(["bench", "engine", "--model", str(tiny_ckpt), "--concurrency", "4", "--input-len", "16",
               "--output-len", "6", "--reps", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    load = res["load"]
    assert load["concurrency"] == 4 and load["num_requests"] == 4
    assert load["output_tokens"] == 4 * 6
    assert load["output_tok_s"] > 0 and load["wall_s"] > 0
    assert load["ttft_ms"]["n"] == 4 and load["itl_ms"]["n"] == 4 * 5
    assert len(load["bubble_ratio_run"]) == 1 and 0 <= load["bubble_ratio_run"][0] < 1
    assert res["batch1"]["decode_ms_per_token"] > 0 and len(res["batch1"]["first_ids"]) == 6
    assert res["layout"] == {"tp": 1, "pp": 1, "micro_batches": 1, "device": "cpu", "cpus_per_worker": 1.0,
                             "executor": "in-process", "token_budget": 512}
    if res["png"]:
        assert out.with_suffix(".png").stat().st_size > 1000
    assert "summary" in capsys.readouterr().out


@pytest.mark.parametrize("extra, msg", [
    ([], "no config.json"),
    (["--tp", "0"], "--tp must be >= 1"),
])
def test_bench_user_errors(tmp_path, capsys, extra, msg):
    rc = main(["bench", "engine", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), *extra])
    assert rc == 2
    assert msg in capsys.readouterr().err
