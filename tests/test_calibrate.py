"""`raypp calibrate`: the fit recovers known factors, the file it writes is a valid `--hardware`,
and against a live tiny deployment the whole round trip runs."""
import json
import math
import threading
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raypp.cli import main
from raypp.planner.hardware import DEVICES, LINKS, load_yaml
from raypp.layout import Layout
from raypp.planner.layout import Cluster
from raypp.planner.live_fit import Phase, _per_step, fit, predicted_phase, rows
from raypp.planner.models import PRESETS
from raypp.runtime.stats import EngineStats, RequestStats, StageStats
from serve_helpers import ServeRun, load_deployment

SMALL = PRESETS["small"]
LAYOUT = Layout(2, 2, (4, 4))
TRUE = replace(DEVICES["cpu-epyc-2core"].efficiency, bw=0.55, layer_overhead_decode=3e-4, step_overhead=2e-3, link=0.5,
               call_overhead=1.5e-3)


# one-row decode (the weight stream), and two multi-row loads (the packing against the FLOPs)
LOADS = (1, 4, 16)


def cluster(eff):
    d = replace(DEVICES["cpu-epyc-2core"], efficiency=eff)
    return Cluster(d, 4, 1, LINKS[d.intra_link], LINKS[d.network])


def synthetic_phase(c, requests=16, isl=32, osl=32, eff=TRUE):
    """What an engine whose hardware has factors `eff` would report for one phase (no wall clock:
    only the stage fit applies)."""
    m = 2
    steps = [requests + requests * osl // max(1, c // m)] * 2
    ph = Phase(c, m, isl, osl, requests, steps, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], requests * osl, 0.0,
               [n * eff.call_overhead for n in steps])
    per = _per_step(SMALL, LAYOUT, cluster(eff), ph, "fp32")
    return replace(ph, compute_s=[n * p[0] for n, p in zip(steps, per)],
                   comm_s=[n * p[1] for n, p in zip(steps, per)])


def test_fit_reproduces_the_measurements_and_predicts_another_load():
    phases = [synthetic_phase(c) for c in LOADS]
    start = cluster(DEVICES["cpu-epyc-2core"].efficiency)
    got = fit(SMALL, LAYOUT, start, phases, "fp32")
    fitted, truth = rows(SMALL, LAYOUT, cluster(got), phases, "fp32"), rows(SMALL, LAYOUT, start, phases, "fp32")
    assert all(abs(r.error) <= 0.05 for r in fitted), fitted
    assert max(abs(r.error) for r in truth) > 0.3          # the catalog factors alone were far off
    assert got.link == pytest.approx(TRUE.link, rel=0.15)  # comm has its own measurement
    assert got.call_overhead == pytest.approx(TRUE.call_overhead)   # read from the stages' idle time
    # a load it was not fitted to: the per-stage times follow
    other = synthetic_phase(8)
    assert all(abs(r.error) <= 0.10 for r in rows(SMALL, LAYOUT, cluster(got), [other], "fp32"))


def test_fit_raises_the_step_cost_to_what_the_wall_clock_shows():
    # the stages were busy as TRUE says, but each phase took longer: a driver cost outside the stages
    start = cluster(DEVICES["cpu-epyc-2core"].efficiency)
    phases = []
    for c in LOADS:
        ph = synthetic_phase(c)
        slow = predicted_phase(SMALL, LAYOUT, cluster(replace(TRUE, step_overhead=0.02)), ph, "fp32")
        phases.append(replace(ph, tokens=ph.tokens, wall_s=ph.tokens / slow.throughput))
    got = fit(SMALL, LAYOUT, start, phases, "fp32")
    assert got.step_overhead > TRUE.step_overhead
    for ph in phases:
        pred = predicted_phase(SMALL, LAYOUT, cluster(got), ph, "fp32").throughput
        assert pred == pytest.approx(ph.tokens / ph.wall_s, rel=0.10)


def test_fit_finds_the_pipeline_hop_cost_in_the_wall_clock():
    # the stages were busy as TRUE says, but each micro-batch's pass through the pipeline took 4 ms
    # per hop more than the catalog's: the receivers' wake-up, in no stage's busy time
    slow_hops = replace(TRUE, hop_overhead=4e-3)
    phases = []
    for c in LOADS:
        ph = synthetic_phase(c)
        phases.append(replace(ph, wall_s=ph.tokens / predicted_phase(SMALL, LAYOUT, cluster(slow_hops), ph,
                                                                      "fp32").throughput))
    got = fit(SMALL, LAYOUT, cluster(DEVICES["cpu-epyc-2core"].efficiency), phases, "fp32")
    assert got.hop_overhead == pytest.approx(slow_hops.hop_overhead, rel=0.25)
    for ph in phases:
        pred = predicted_phase(SMALL, LAYOUT, cluster(got), ph, "fp32").throughput
        assert pred == pytest.approx(ph.tokens / ph.wall_s, rel=0.05)


def test_fit_without_steps_says_what_to_do():
    empty = replace(synthetic_phase(1), steps=[0, 0])
    with pytest.raises(ValueError, match="run load"):
        fit(SMALL, LAYOUT, cluster(TRUE), [empty], "fp32")


class FakeDeployment(BaseHTTPRequestHandler):
    """/v1/models, /v1/completions and /stats of an engine whose hardware has the factors TRUE:
    /stats returns the totals of the phases whose completions have all finished."""
    phases: list[Phase] = []
    requests = 16
    done = 0
    lock = threading.Lock()

    def _json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._json({"object": "list", "data": [{"id": "small", "object": "model", "created": 0,
                                                           "owned_by": "raypp", "max_model_len": 2048}]})
        finished = self.phases[:self.done // self.requests]
        stages = [StageStats(stage=s, tp_rank=0, steps=sum(p.steps[s] for p in finished),
                             busy_s=sum(p.compute_s[s] + p.comm_s[s] for p in finished),
                             compute_s=sum(p.compute_s[s] for p in finished),
                             comm_s=sum(p.comm_s[s] for p in finished), idle_s=0.0, wait_prev_stage_s=0.0,
                             wait_tokens_s=0.0, bubble_s=0.0, bubble_ratio=0.0) for s in range(2)]
        self._json(asdict(EngineStats(0, 0, 0, 2, 100, 100, 0, sum(p.tokens for p in finished), 0.0,
                                      RequestStats(), stages)))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["ignore_eos"] and body["max_tokens"] == 32 and len(body["prompt"]) == 32
        with self.lock:
            type(self).done += 1
        self._json({"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "small", "choices": []})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_url():
    FakeDeployment.phases = [synthetic_phase(c) for c in LOADS]
    FakeDeployment.done = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeDeployment)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_calibrate_writes_a_hardware_file_plan_accepts(fake_url, tmp_path, capsys):
    out = tmp_path / "cpu-calibrated.yaml"
    assert main(["calibrate", fake_url, "--model", "small", "--gpu", "cpu", "--tp", "2", "--dtype", "fp32",
                 "--concurrency", "1,4,16", "--requests", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage 1 compute" in text and "wrote" in text
    devices, _ = load_yaml(out)
    eff = devices["cpu-epyc-2core-calibrated"].efficiency
    assert eff.link == pytest.approx(TRUE.link, rel=0.15) and eff != DEVICES["cpu-epyc-2core"].efficiency
    assert main(["plan", "--model", "small", "--gpu", "cpu-epyc-2core-calibrated", "--hardware", str(out),
                 "--gpus-per-node", "4", "--dtype", "fp32", "--tp", "2", "--pp", "2", "--concurrency", "8",
                 "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert plan["tp"] == 2 and plan["pp"] == 2 and math.isfinite(plan["itl_ms"])


def test_calibrate_unreachable_deployment_says_so(tmp_path, capsys):
    rc = main(["calibrate", "http://127.0.0.1:9", "--model", "small", "--gpu", "cpu", "--out",
               str(tmp_path / "x.yaml")])
    assert rc == 2 and "is the deployment at http://127.0.0.1:9 running?" in capsys.readouterr().err


def test_calibrate_against_a_live_tiny_deployment(tmp_path, capsys):
    out = tmp_path / "tiny-cpu.yaml"
    with ServeRun(load_deployment("tiny_cpu.yaml"), tmp_path) as server:
        assert main(["calibrate", server.base_url, "--model", "tiny", "--gpu", "cpu", "--tp", "2", "--dtype",
                     "fp32", "--concurrency", "1,4", "--requests", "4", "--input-len", "8", "--output-len", "8",
                     "--name", "cpu-live", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage 0 compute" in text and "stage 1 compute" in text
    assert main(["plan", "--model", "tiny", "--gpu", "cpu-live", "--hardware", str(out), "--gpus-per-node", "4",
                 "--dtype", "fp32", "--tp", "2", "--pp", "2", "--concurrency", "4", "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert plan["itl_ms"] > 0 and plan["throughput_tok_s"] > 0
