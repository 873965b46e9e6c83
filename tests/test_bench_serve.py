"""`raypp bench serve` against a live `serve run` of the tiny checkpoint at PP = 2 (so the server
reports two stages), with small numbers: the JSON has every field, the counts add up, refused
requests are counted by kind, and a bad URL or a dead server is one line and a non-zero exit."""
import json
import subprocess
import sys

import pytest

from raypp.benchmark.http_load import LevelResult
from raypp.cli import main
from tests.serve_helpers import ServeRun, free_port

MAX_NUM_SEQS = 4


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    config = {"applications": [{
        "name": "raypp", "route_prefix": "/", "import_path": "raypp.serve:build_app",
        "args": {"model": {"path": str(tiny_ckpt), "served_name": "tiny"},
                 "parallel": {"pp": 2, "device": "cpu", "cpus_per_worker": 0.5},
                 # A burst over 2 x max_num_seqs is refused with 429; a closed loop of max_num_seqs is not
                 # (a sequence the client saw finish may still hold its slot for a step).
                 "scheduler": {"max_num_seqs": MAX_NUM_SEQS, "max_queue": MAX_NUM_SEQS, "num_kv_blocks": 256}},
        "deployments": [{"name": "LLMServer", "ray_actor_options": {"num_cpus": 0.5}}]}]}
    with ServeRun(config, tmp_path_factory.mktemp("serve_bench")) as s:
        yield s


def _bench(server, tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--url", server.base_url, "--input-len", "8", "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_sweep_writes_every_field_and_the_counts_add_up(server, tmp_path, capsys):
    png = tmp_path / "serve.png"
    rc, res = _bench(server, tmp_path, "--concurrency", f"1,{MAX_NUM_SEQS}", "--requests", "6",
                     "--output-len", "4", "--plot", str(png))
    assert rc == 0 and res["model"] == "tiny" and res["url"] == server.base_url
    assert [r["concurrency"] for r in res["runs"]] == [1, MAX_NUM_SEQS]
    fields = set(LevelResult.__dataclass_fields__) - {"timeline_s"} | {"bubble_ratio"}
    for r in res["runs"]:
        assert set(r) == fields
        assert r["requests"] == 6 == r["succeeded"] + r["failed"] and r["failed"] == 0 and r["errors"] == {}
        assert r["output_tokens"] == 6 * 4 and r["output_tok_s"] > 0 and r["req_s"] > 0 and r["wall_s"] > 0
        assert r["ttft_ms"]["n"] == r["e2e_ms"]["n"] == 6 and 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p99"]
        assert 0 < r["itl_ms"]["n"] <= 6 * 3   # chunks with text: a held-back token sends none
        assert [s["stage"] for s in r["stages"]] == [0, 1]
        assert all(s["steps"] > 0 and s["busy_s"] > 0 and 0 <= s["bubble_ratio"] <= 1 for s in r["stages"])
        assert r["bubble_ratio"] == [s["bubble_ratio"] for s in r["stages"]]
    assert png.stat().st_size > 1000
    printed = capsys.readouterr()
    assert "TTFT p50" in printed.out and "bubble/stage" in printed.out
    assert f"{6}/6 requests" in printed.err   # the progress line


def test_refused_requests_are_counted_by_kind(server, tmp_path):
    rc, res = _bench(server, tmp_path, "--concurrency", "16", "--requests", "16", "--output-len", "48",
                     "--rate", "1000")
    [r] = res["runs"]
    assert rc == 0 and r["rate"] == 1000
    assert r["requests"] == 16 == r["succeeded"] + r["failed"] and r["failed"] >= 1
    assert r["errors"] == {"RateLimitError": r["failed"]}
    assert r["output_tokens"] == r["succeeded"] * 48 and r["e2e_ms"]["n"] == r["succeeded"]


@pytest.mark.parametrize("url, says", [
    (f"http://127.0.0.1:{free_port()}", "cannot reach"),
    ("127.0.0.1:8000", "give an http(s) URL"),
])
def test_bad_url_or_dead_server_is_one_line_and_exit_2(url, says):
    p = subprocess.run([sys.executable, "-m", "raypp.cli", "bench", "serve", "--url", url, "--requests", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
