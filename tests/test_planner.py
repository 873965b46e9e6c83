"""Planner arithmetic: model shapes, memory per GPU, catalog look-ups, the CLI's table and JSON."""
import json

import pytest

from raypp.cli import main
from raypp.errors import UserError
from raypp.planner.hardware import DEVICES, LINKS, get_device, load_yaml
from raypp.layout import Layout
from raypp.planner.layout import Cluster, Workload, stage_shapes
from raypp.planner.memory import memory
from raypp.planner.models import PRESETS, from_hf_config, get_model
from raypp.planner.strategy import Options, plan

GB = 1e9


def cluster(gpu="h100-sxm", gpn=8, nodes=1):
    d = DEVICES[gpu]
    return Cluster(d, gpn, nodes, LINKS[d.intra_link], LINKS[d.network])


# Published parameter counts (model cards / config.json arithmetic).
@pytest.mark.parametrize("name,params_b", [
    ("llama-2-7b", 6.74), ("llama-2-70b", 68.98), ("llama-3-8b", 8.03), ("llama-3-70b", 70.55),
    ("llama-3.1-405b", 405.85), ("mistral-7b", 7.24), ("qwen2-72b", 72.71)])
def test_parameter_counts(name, params_b):
    assert PRESETS[name].params / 1e9 == pytest.approx(params_b, rel=0.005)


def test_llama3_70b_bf16_weights_are_141_gb():
    m = PRESETS["llama-3-70b"]
    assert m.params * 2 / GB == pytest.approx(141, rel=0.01)
    # TP8: each GPU holds an eighth (embedding and lm_head are vocab-parallel too)
    lay = Layout(8, 1, (80,))
    shapes = stage_shapes(m, lay, Workload(dtype="bf16"))
    assert shapes[0].weight_bytes / GB == pytest.approx(141.1 / 8, rel=0.01)


def test_kv_cache_bytes_per_token():
    # 2 (K,V) x layers x kv_heads x head_dim x bytes
    assert PRESETS["llama-3-70b"].kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2  # 320 KiB
    assert PRESETS["llama-2-7b"].kv_bytes_per_token(2) == 512 * 1024              # MHA: 512 KiB
    assert PRESETS["llama-3-8b"].kv_bytes_per_token(1) == 64 * 1024               # fp8 KV


def test_flops_per_token_is_twice_the_matmul_weights():
    m = PRESETS["llama-3-8b"]
    # ~2 x (params - embedding table) at zero context
    assert m.flops_per_token(0) == pytest.approx(2 * (m.params - m.embed_params), rel=0.001)
    assert m.flops_per_token(1000) - m.flops_per_token(0) == 4 * 32 * 32 * 128 * 1000


def test_fp8_halves_linear_weights_but_not_embeddings():
    m = PRESETS["llama-3-70b"]
    lay = Layout(1, 1, (80,))
    bf16 = stage_shapes(m, lay, Workload(dtype="bf16"))[0].weight_bytes
    fp8 = stage_shapes(m, lay, Workload(dtype="fp8"))[0].weight_bytes
    assert fp8 == pytest.approx(bf16 / 2 + m.embed_params + m.head_params, rel=0.001)


def test_memory_budget_and_misfit_shortfall():
    m = PRESETS["llama-3-70b"]
    wl = Workload(dtype="bf16", concurrency=64, input_len=1000, output_len=200)
    ok = Layout(8, 1, (80,))
    mem = memory(m, ok, stage_shapes(m, ok, wl), cluster(), wl, 64)
    assert mem.fits and mem.capacity == pytest.approx(72 * GB)
    assert mem.kv_tokens * 2 * 80 * 1 * 128 * 2 == pytest.approx(mem.kv_cache, rel=0.001)  # 1 KV head per GPU
    assert mem.kv_seqs == mem.kv_tokens // 1200
    bad = Layout(1, 1, (80,))
    miss = memory(m, bad, stage_shapes(m, bad, wl), cluster(), wl, 64)
    assert not miss.fits
    # 141 GB of weights + overhead + activations + one context against 72 GB usable
    assert 69 * GB < miss.shortfall < 73 * GB


@pytest.mark.parametrize("dtype,copies", [("fp32", 2), ("bf16", 1)])
def test_cpu_workers_hold_their_packed_weight_copies(dtype, copies):
    """A CPU worker keeps oneDNN's packed copy of every linear weight, and for fp32 the decode
    panels too (kernels/cpu_linear.py); the embedding table once.  A GPU holds one copy."""
    m, lay = PRESETS["small"], Layout(1, 1, (PRESETS["small"].layers,))
    wl = Workload(dtype=dtype, concurrency=4, input_len=128, output_len=128)
    shape = stage_shapes(m, lay, wl)[0]
    cpu = memory(m, lay, [shape], cluster("cpu-epyc-2core", 2), wl, 4)
    assert cpu.weights == pytest.approx(shape.weight_bytes + copies * shape.stream_bytes)
    assert memory(m, lay, [shape], cluster(), wl, 4).weights == pytest.approx(shape.weight_bytes)


def test_tp_beyond_kv_heads_replicates_kv():
    m = PRESETS["tiny"]  # 8 KV heads
    wl = Workload(dtype="fp32", kv_dtype="fp32")
    per_gpu = stage_shapes(m, Layout(16, 1, (8,)), wl)[0].kv_bytes_per_token
    assert per_gpu == 2 * 8 * 1 * 16 * 4


def test_hf_config_matches_preset(tmp_path):
    cfg = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
           "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False,
           "max_position_embeddings": 8192, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = from_hf_config(tmp_path)
    assert m.params == PRESETS["llama-3-70b"].params
    assert get_model(str(tmp_path / "config.json")).kv_heads == 8
    # the runtime's parser reads it, so what the runtime rejects the planner rejects too
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="not supported"):
        from_hf_config(tmp_path)


@pytest.mark.parametrize("spelling,canonical", [
    ("llama-3-70b", "llama-3-70b"), ("Meta-Llama-3-70B-Instruct", "llama-3-70b"), ("llama3-70b", "llama-3-70b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"), ("llama-2-7b", "llama-2-7b"),
    ("Llama-3.1-405B-Instruct", "llama-3.1-405b"), ("mistral-7b-instruct-v0.2", "mistral-7b"),
    ("Qwen/Qwen2-72B", "qwen2-72b"), ("small", "small")])
def test_model_spellings(spelling, canonical):
    assert get_model(spelling).name == canonical


@pytest.mark.parametrize("spelling,canonical", [
    ("a100-sxm-80gb", "a100-sxm-80gb"), ("H100-SXM", "h100-sxm"), ("h100_pcie", "h100-pcie"), ("h200", "h200"),
    ("L4", "l4"), ("l40s", "l40s"), ("a100-40gb", "a100-sxm-40gb"), ("cpu", "cpu-epyc-2core")])
def test_gpu_spellings(spelling, canonical):
    assert get_device(spelling).name == canonical


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UserError, match="h100-sxm.*l40s|known:.*h100-sxm"):
        get_device("h900")
    with pytest.raises(UserError, match="llama-3-70b"):
        get_model("gpt-5")


def test_every_catalog_number_has_a_source():
    for d in DEVICES.values():
        assert d.source and d.memory > 0 and d.bandwidth > 0 and d.flops.get("bf16")
    for link in LINKS.values():
        assert link.source and link.bandwidth > 0


def test_user_hardware_yaml(tmp_path):
    f = tmp_path / "hw.yaml"
    f.write_text("links:\n  my-net: {kind: network, bandwidth_gbs: 25, latency_us: 10, source: test}\n"
                 "gpus:\n  my-gpu: {memory_gb: 96, bandwidth_gbs: 4000, tflops: {bf16: 900, fp8: 1800},\n"
                 "          intra_link: nvlink4, network: my-net, source: test sheet}\n")
    devices, links = load_yaml(f)
    assert get_device("my-gpu", devices).memory == 96 * GB
    assert links["my-net"].bandwidth == 25 * GB
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus:\n  x: {memory_gb: 1}\n")
    with pytest.raises(UserError, match="needs"):
        load_yaml(bad)


def test_hardware_file_keeps_small_fitted_costs_as_numbers(tmp_path):
    # `raypp calibrate` can fit a per-step cost under 0.1 ms; written as `5e-05`, YAML 1.1 read it
    # back as a string and `raypp plan --hardware` failed adding it to a float.
    from dataclasses import fields, replace

    from raypp.planner.live_fit import hardware_yaml

    cpu = DEVICES["cpu-epyc-2core"]
    eff = replace(cpu.efficiency, step_overhead=5e-05, layer_overhead_decode=1.25e-06, call_overhead=0.0)
    f = tmp_path / "fitted.yaml"
    f.write_text(hardware_yaml(cpu, eff, "cpu-fitted", "test"))
    got = load_yaml(f)[0]["cpu-fitted"].efficiency
    for fd in fields(eff):
        assert getattr(got, fd.name) == pytest.approx(getattr(eff, fd.name), rel=1e-5), fd.name
        assert type(getattr(got, fd.name)) is type(getattr(eff, fd.name)), fd.name
    hand = tmp_path / "hand.yaml"
    text = ("gpus:\n  g: {memory_gb: 1, bandwidth_gbs: 1, tflops: {fp32: 1}, source: s,\n"
            "      efficiency: {step_overhead: 5e-05, host_cores: 2}}\n")
    hand.write_text(text)
    assert load_yaml(hand)[0]["g"].efficiency.step_overhead == 5e-05
    hand.write_text(text.replace("host_cores", "cores"))
    with pytest.raises(UserError, match="efficiency takes numbers for bw, "):
        load_yaml(hand)


def test_plan_prefers_tp_for_latency_and_lists_misfits():
    m = PRESETS["llama-3-70b"]
    wl = Workload(dtype="bf16", concurrency=1, input_len=1000, output_len=200)
    cands = plan(m, cluster(nodes=2), wl, Options(priority="latency"))
    best = cands[0]
    assert best.fits and best.layout.tp == 8
    assert any(not c.fits for c in cands) and all(c.fits for c in cands[:3])
    assert sum(best.layout.stage_layers) == 80


def test_slo_filters_choice():
    m = PRESETS["llama-3-8b"]
    wl = Workload(dtype="bf16", concurrency=64, input_len=1000, output_len=200)
    cands = plan(m, cluster(), wl, Options(priority="throughput"))
    free = cands[0]
    fastest = min(c.prediction.ttft for c in cands if c.fits)
    assert fastest < free.prediction.ttft   # the throughput pick is not the lowest-TTFT layout
    tight = plan(m, cluster(), wl, Options(priority="throughput", max_ttft_ms=fastest * 1e3 * 1.001))[0]
    assert tight.meets_slo and tight.prediction.ttft == pytest.approx(fastest)
    none = plan(m, cluster(), wl, Options(priority="throughput", max_ttft_ms=fastest * 1e3 * 0.5))[0]
    assert not none.meets_slo and any("no layout meets" in f.message for f in none.flags)


def test_cli_table_and_json(capsys):
    argv = ["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--gpus-per-node", "8", "--nodes", "2",
            "--dtype", "bf16", "--priority", "throughput", "--concurrency", "64", "--input-len", "1000",
            "--output-len", "200"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Chosen:" in out and "TP8" in out and "do not fit" in out
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["chosen"] and sum(r["chosen"] for r in rows) == 1
    for key in ("tp", "pp", "memory_per_gpu_gb", "ttft_ms", "itl_ms", "throughput_tok_s", "bubble_fraction",
                "warnings"):
        assert key in rows[0]
    fitting = [r for r in rows if r["fits"]]
    assert rows[0]["throughput_tok_s"] == max(r["throughput_tok_s"] for r in fitting)
    assert any(not r["fits"] and r["shortfall_gb"] > 0 for r in rows)


def test_cli_user_errors_are_one_line(capsys):
    assert main(["plan", "--model", "llama-3-70b", "--gpu", "h900"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "known:" in err
    assert main(["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "3"]) == 2
    assert main(["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--input-len", "9000"]) == 2


def test_explanation_names_the_latency_and_throughput_picks_with_numbers(capsys):
    args = ["plan", "--model", "llama-3.1-405b", "--gpu", "h200", "--dtype", "fp8", "--concurrency", "512",
            "--input-len", "2048", "--output-len", "128", "--priority", "throughput"]
    assert main(args) == 0
    out = capsys.readouterr().out
    fast = next(line for line in out.splitlines() if "lowest latency (" in line)
    most = next(line for line in out.splitlines() if "more throughput (" in line)
    assert "ms/token at concurrency 512" in fast
    # the 405B pipeline wins throughput because PP overlaps prefill and needs no all-reduce
    assert "PP" in most.split(":")[0] and "because" in most and "prefill" in most
    assert main(["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--nodes", "2", "--concurrency", "64",
                 "--priority", "throughput"]) == 0
    assert "lowest latency (" in capsys.readouterr().out


def test_raypps_own_presets_are_the_checkpoints_make_tiny_writes():
    from raypp.model import tiny
    for name, cfg in tiny.PRESETS.items():
        m = PRESETS[name]
        assert (m.hidden, m.layers, m.heads, m.kv_heads, m.intermediate, m.vocab, m.hd, m.tied) == (
            cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"], cfg["tie_word_embeddings"])

