"""The four classic mistakes: each flagged with numbers when made, silent when not."""
from raypp.planner.hardware import DEVICES, LINKS
from raypp.planner.layout import Cluster, Workload
from raypp.planner.models import PRESETS
from raypp.planner.strategy import Options, plan


def run(model="llama-3-70b", gpu="h100-sxm", gpn=8, nodes=1, concurrency=64, micro_batches=None, **opts):
    d = DEVICES[gpu]
    cluster = Cluster(d, gpn, nodes, LINKS[d.intra_link], LINKS[d.network])
    wl = Workload(dtype="bf16", kv_dtype="bf16", concurrency=concurrency, input_len=1000, output_len=200,
                  micro_batches=micro_batches)
    cands = plan(PRESETS[model], cluster, wl, Options(**opts))
    assert len(cands) == 1 and cands[0].fits, cands
    return cands[0]


def codes(c):
    return {f.code for f in c.flags}


def message(c, code):
    return next(f.message for f in c.flags if f.code == code)


def test_tp_over_pcie():
    c = run(model="llama-3-8b", gpu="l40s", gpn=4, tp=4, pp=1)
    assert "tp-over-pcie" in codes(c)
    assert "pcie4" in message(c, "tp-over-pcie") and "% of a decode step" in message(c, "tp-over-pcie")
    assert "tp-over-pcie" not in codes(run(model="llama-3-8b", gpu="h100-sxm", tp=4, pp=1))
    assert "tp-over-pcie" not in codes(run(model="llama-3-8b", gpu="l40s", gpn=4, tp=1, pp=1))


def test_tp_across_nodes():
    c = run(gpn=8, nodes=2, tp=16, pp=1)
    assert "tp-across-nodes" in codes(c)
    assert "ib-ndr" in message(c, "tp-across-nodes") and "2 nodes" in message(c, "tp-across-nodes")
    # the all-reduce over the network costs more than over NVLink
    inside = run(gpn=8, nodes=2, tp=8, pp=2)
    assert "tp-across-nodes" not in codes(inside)
    assert sum(t.all_reduce for t in c.prediction.decode_stages) > sum(
        t.all_reduce for t in inside.prediction.decode_stages)


def test_pp_with_too_little_concurrency():
    c = run(concurrency=1, nodes=2, tp=4, pp=4)
    assert "pp-underfilled" in codes(c)
    assert c.prediction.bubble > 0.7          # 1 micro-batch on 4 stages: each idles 3/4 of the time
    assert "1 sequence(s)" in message(c, "pp-underfilled")
    assert "pp-underfilled" not in codes(run(concurrency=64, nodes=2, tp=4, pp=4))


def test_bubble_above_threshold():
    # enough sequences, but one micro-batch for two stages: half of each round idles
    c = run(concurrency=64, nodes=2, micro_batches=1, tp=8, pp=2)
    assert "bubble" in codes(c) and "pp-underfilled" not in codes(c)
    assert 0.45 < c.prediction.bubble < 0.55
    assert "> 10%" in message(c, "bubble")
    ok = run(concurrency=64, nodes=2, micro_batches=2, tp=8, pp=2)
    assert "bubble" not in codes(ok) and ok.prediction.bubble < 0.10
    assert "2 micro-batches would give bubble" in message(c, "bubble")
    # decode reads the weights once per micro-batch, so filling the pipeline gains far less than 2x here
    assert c.throughput < ok.throughput < 1.5 * c.throughput
    # the threshold is the user's
    assert "bubble" not in codes(run(concurrency=64, nodes=2, micro_batches=1, tp=8, pp=2, max_bubble=0.6))


def test_unbalanced_stages_and_the_fix():
    # Llama-3-8B: the 128k-vocab lm_head costs ~2 layers, so 8/8/8/8 overloads the last stage
    c = run(model="llama-3-8b", tp=1, pp=4, stage_layers=(8, 8, 8, 8))
    assert "unbalanced" in codes(c)
    msg = message(c, "unbalanced")
    balanced = run(model="llama-3-8b", tp=1, pp=4)
    assert str(list(balanced.layout.stage_layers)) in msg and "lm_head" in msg
    assert "unbalanced" not in codes(balanced)
    # stage 0 also pays the per-step cost (scheduling, input preparation): it gets fewest layers
    split = balanced.layout.stage_layers
    assert split[-1] < max(split[1:-1]) and split[0] == min(split) and sum(split) == 32
    assert balanced.prediction.itl < c.prediction.itl
