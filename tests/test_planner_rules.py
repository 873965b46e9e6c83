"""The rules of thumb raypp is built on, as they come out of the performance model's numbers.

No rule is written into the planner as an if-statement; each test asks the model and checks
that the numbers land on the rule's side.  The model's factors are the fit to published
measurements (tests/test_planner_calibration.py), and the 405B rows are its held-out check.
"""
import pytest

from raypp.planner.hardware import DEVICES, LINKS
from raypp.planner.layout import Cluster, Workload
from raypp.planner.models import PRESETS
from raypp.planner.strategy import Options, plan


def cands(model, gpu, concurrency, nodes=1, priority="throughput", dtype="bf16", **pin):
    d = DEVICES[gpu]
    cluster = Cluster(d, 8, nodes, LINKS[d.intra_link], LINKS[d.network])
    wl = Workload(dtype=dtype, kv_dtype=dtype, concurrency=concurrency, input_len=1000, output_len=200)
    return plan(PRESETS[model], cluster, wl, Options(priority=priority, **pin))


def one(model, gpu, concurrency, tp, pp, **kw):
    (c,) = cands(model, gpu, concurrency, tp=tp, pp=pp, **kw)
    assert c.fits
    return c


@pytest.mark.parametrize("model,gpu", [("llama-3-70b", "h100-sxm"), ("llama-3-8b", "a100-sxm-80gb"),
                                       ("llama-3.1-405b", "h200")])
def test_nvlink_node_tp_gives_the_lowest_latency(model, gpu):
    dtype = "fp8" if model == "llama-3.1-405b" else "bf16"
    best = cands(model, gpu, 1, priority="latency", dtype=dtype)[0]
    assert best.layout.tp == 8 and best.layout.pp == 1, best.layout.name
    pp8 = one(model, gpu, 1, 1, 8, dtype=dtype)
    assert pp8.prediction.itl > 2 * best.prediction.itl    # one GPU at a time reads all the weights


@pytest.mark.parametrize("model,gpu", [("llama-3-8b", "l40s"), ("llama-3-70b", "l40s"), ("llama-3-70b", "l4"),
                                       ("llama-3-70b", "a100-pcie-80gb"), ("llama-3-70b", "h100-pcie")])
def test_pcie_pp_or_small_tp_beats_large_tp_on_throughput(model, gpu):
    best = cands(model, gpu, 128, dtype="fp8")[0]
    tp8 = one(model, gpu, 128, 8, 1, dtype="fp8")
    assert best.layout.tp < 8, best.layout.name
    assert best.throughput > 1.3 * tp8.throughput
    assert "tp-over-pcie" in {f.code for f in tp8.flags}


def test_pp_across_nodes_with_tp_inside():
    best = cands("llama-3-70b", "h100-sxm", 64, nodes=2)[0]
    assert best.layout.tp <= 8
    across = one("llama-3-70b", "h100-sxm", 64, 16, 1, nodes=2)
    inside = one("llama-3-70b", "h100-sxm", 64, 8, 2, nodes=2)
    assert inside.throughput > 1.5 * across.throughput
    assert inside.prediction.itl < across.prediction.itl
    assert "tp-across-nodes" in {f.code for f in across.flags}


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_pp_with_too_few_requests_gains_nothing(pp):
    # one request: a pipeline of pp GPUs is no faster than one GPU, it only adds hops
    alone = one("llama-3-8b", "h100-sxm", 1, 1, 1)
    piped = one("llama-3-8b", "h100-sxm", 1, 1, pp)
    assert piped.throughput <= alone.throughput
    assert piped.prediction.itl >= alone.prediction.itl
    assert "pp-underfilled" in {f.code for f in piped.flags}
    # enough requests fill it: then PP's throughput beats the lone GPU's
    assert one("llama-3-8b", "h100-sxm", 64 * pp, 1, pp).throughput > alone.throughput
