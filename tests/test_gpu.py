"""The CUDA path, checked on a GPU (each test skips where torch sees none).

Tolerances (relative error ||out - ref|| / ||ref||):
- kernels vs their torch references at serving shapes: fp32 < 1e-5, bf16 < 1e-2 (the two
  round at different points: one rounding of bf16 is 2^-8 ~ 4e-3).
- the model in bf16 vs transformers: both are compared with transformers in fp32; raypp's
  error must be at most twice transformers' own bf16 error (plus 1e-3), and below 5e-2.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from kernels import activation, gemv, paged_attention, rmsnorm, rotary  # noqa: E402
from raypp.model import ops  # noqa: E402
from raypp.model.attention import AttentionMetadata  # noqa: E402
from raypp.model.rope import inv_frequencies, rope_cos_sin  # noqa: E402
from tests.reference import random_prompts  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(out, ref) -> float:
    assert torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def randn(*shape, dtype):
    return torch.randn(*shape, device="cuda").to(dtype)  # fresh data every call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_references_at_serving_shapes(dtype):
    x, res, w = randn(300, 4096, dtype=dtype), randn(300, 4096, dtype=dtype), randn(4096, dtype=dtype)
    assert rel(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_ref(x, w, 1e-5)) < TOL[dtype]
    out, h = rmsnorm.add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_h = rmsnorm.add_rms_norm_ref(x, res, w, 1e-5)
    assert rel(h, ref_h) < TOL[dtype] and rel(out, ref_out) < TOL[dtype]
    g, u = randn(300, 11008, dtype=dtype), randn(300, 11008, dtype=dtype)
    assert rel(activation.silu_and_mul(g, u), activation.silu_and_mul_ref(g, u)) < TOL[dtype]
    cos, sin = rope_cos_sin(torch.arange(300, device="cuda") * 7, inv_frequencies(128, 5e5, None).cuda(), dtype)
    q, k, v = randn(300, 32, 128, dtype=dtype), randn(300, 8, 128, dtype=dtype), randn(300, 8, 128, dtype=dtype)
    slots = torch.randperm(1000, device="cuda")[:300]
    cache = randn(2, 1000, 8, 128, dtype=dtype)
    ref_cache = cache.clone()
    out = rotary.rope_and_cache(q, k, v, cos, sin, cache[0], cache[1], slots)
    ref = rotary.rope_and_cache_ref(q, k, v, cos, sin, ref_cache[0], ref_cache[1], slots)
    assert rel(out, ref) < TOL[dtype] and rel(cache, ref_cache) < TOL[dtype]
    x, w, b = randn(1, 2048, dtype=dtype), randn(16384, 2048, dtype=dtype), randn(16384, dtype=dtype)
    assert rel(gemv.gemv(x, w, b), gemv.gemv_ref(x, w, b)) < TOL[dtype]
    x, w = randn(1, 8192, dtype=dtype), randn(2048, 8192, dtype=dtype)
    assert rel(gemv.gemv(x, w), gemv.gemv_ref(x, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(32, 8, 128), (16, 8, 64), (8, 8, 64)])
def test_paged_decode_attention_matches_reference(q_heads, kv_heads, head_dim, dtype):
    lens, bs = [1, 17, 600, 2048, 63], 16
    widest = max((n + bs - 1) // bs for n in lens)
    num_blocks = widest * len(lens) + 5
    tables = torch.randperm(num_blocks, device="cuda")[: widest * len(lens)].view(len(lens), widest).int()
    k, v = randn(num_blocks * bs, kv_heads, head_dim, dtype=dtype), randn(num_blocks * bs, kv_heads, head_dim, dtype=dtype)
    q = randn(len(lens), q_heads, head_dim, dtype=dtype)
    args = (q, k, v, tables, torch.tensor(lens, dtype=torch.int32, device="cuda"), max(lens), bs, head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    out.copy_(paged_attention.paged_decode_attention(*args))
    assert rel(out, paged_attention.paged_decode_attention_ref(*args)) < TOL[dtype]


def test_default_backends_on_cuda():
    assert ops.backend(torch.device("cuda")) == "triton"
    assert ops.backend(torch.device("cuda"), attention=True) == ("flashinfer" if ops.HAS_FLASHINFER else "triton")


def _worker(path, dtype="auto", num_blocks=64, **kw):
    from raypp.model.config import ModelConfig
    from raypp.parallel.layout import make_layout
    from raypp.runtime.worker import StageWorker
    cfg = ModelConfig.from_dir(path)
    return StageWorker(str(path), dtype, make_layout(cfg, 1, 1), 0, 0, num_blocks=num_blocks, block_size=16,
                       device="cuda", **kw)


def _step(token_ids, query_lens, seq_lens, tables, **kw):
    from raypp.runtime.step import StepInput
    return StepInput(token_ids=token_ids, query_lens=query_lens, seq_lens=seq_lens, block_tables=tables, **kw)


@torch.inference_mode()
def test_model_bf16_vs_transformers(small_ckpt):
    """Prefill logits of raypp (CUDA kernels, bf16) and transformers (bf16) against
    transformers in fp32, prompts batched in one step."""
    from transformers import AutoModelForCausalLM

    worker = _worker(small_ckpt)
    assert worker.dtype == torch.bfloat16  # "auto" on CUDA
    prompts = random_prompts(4096, [5, 40, 128])
    lens = [len(p) for p in prompts]
    tables = [[i * 16 + j for j in range(16)] for i in range(len(prompts))]
    ours = worker.execute(_step(sum(prompts, []), lens, lens, tables, sample_rows=[], all_logits=True)).logits
    hf = {dt: AutoModelForCausalLM.from_pretrained(small_ckpt, dtype=dt).cuda().eval()
          for dt in (torch.float32, torch.bfloat16)}
    for ours_p, prompt in zip(ours.split(lens), prompts):
        ids = torch.tensor([prompt], device="cuda")
        ref = hf[torch.float32](ids).logits[0].float()
        hf_err = rel(hf[torch.bfloat16](ids).logits[0], ref)
        our_err = rel(ours_p, ref)
        print(f"prompt {len(prompt)}: raypp bf16 {our_err:.2e}, transformers bf16 {hf_err:.2e} (vs fp32)")
        assert our_err <= 2 * hf_err + 1e-3 and our_err < 5e-2


@torch.inference_mode()
def test_worker_tp1_greedy_decode_matches_model_and_cuda_graph(small_ckpt):
    """TP=1 through the engine's StageWorker on CUDA (pinned inputs, bf16, sampling on the
    GPU) gives the tokens the model gives when driven directly, and a CUDA-graph replay of
    the decode step gives the eager step's logits.  (The worker runs eagerly here: a graph's
    attention splits the context differently, which in bf16 may flip a near-tie; the fp32
    test below pins the worker's graphs to its eager tokens.)"""
    from raypp.model.cuda_graph import DecodeGraph
    from tests.reference import greedy

    prompts = random_prompts(4096, [9, 30])
    lens = [len(p) for p in prompts]
    tables = [[i * 8 + j for j in range(8)] for i in range(len(prompts))]
    worker = _worker(small_ckpt, cuda_graph_max_batch=0)
    params = [greedy(8)] * 2
    kw = dict(sample_rows=[0, 1], params=params, seeds=[0, 0])
    ids = worker.execute(_step(sum(prompts, []), lens, lens, tables, output_positions=[0, 0], **kw)).token_ids
    worker_ids = [ids]
    for n in range(1, 8):
        lens = [x + 1 for x in lens]
        ids = worker.execute(_step(ids, [1, 1], lens, tables, output_positions=[n, n], step_id=n, **kw)).token_ids
        worker_ids.append(ids)

    model = worker.model
    model.allocate_kv_cache(65, 16)
    graph = DecodeGraph(model, batch=2, max_blocks=8, block_size=16, scratch_block=64)
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata.build(lens, lens, tables, 16)
    ids = model(torch.tensor(sum(prompts, []), device="cuda"), meta).argmax(-1)
    direct_ids = [ids.tolist()]
    for _ in range(7):
        lens = [x + 1 for x in lens]
        meta = AttentionMetadata.build([1, 1], lens, tables, 16).to("cuda")
        eager = model(ids, meta)
        replayed = graph(ids, lens, tables).clone()
        assert rel(replayed, eager) < 1e-3
        ids = eager.argmax(-1)
        direct_ids.append(ids.tolist())
    assert worker_ids == direct_ids


@torch.inference_mode()
def test_seeded_sampling_on_cuda_is_reproducible(small_ckpt):
    from raypp.model.sampling_params import SamplingParams
    worker = _worker(small_ckpt)
    prompt = random_prompts(4096, [12])[0]
    p = SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, seed=7)
    step = _step(prompt, [12], [12], [[0]], sample_rows=[0], params=[p], seeds=[7], output_positions=[0])
    first = worker.execute(step).token_ids
    step.step_id = 1
    assert worker.execute(step).token_ids == first


@torch.inference_mode()
def test_batch1_decode_gemv_matches_cublas(small_ckpt, monkeypatch):
    """At batch 1 every product goes through kernels/gemv.py; the logits match cuBLAS's."""
    worker = _worker(small_ckpt)
    model, prompt = worker.model, random_prompts(4096, [20])[0]
    logits = {}
    for use_gemv in (True, False):
        monkeypatch.setattr(ops, "use_gemv", use_gemv)
        model.allocate_kv_cache(8, 16)
        model(torch.tensor(prompt, device="cuda"), AttentionMetadata.build([20], [20], [[0, 1]], 16))
        logits[use_gemv] = model(torch.tensor([5], device="cuda"), AttentionMetadata.build([1], [21], [[0, 1]], 16))
    assert rel(logits[True], logits[False]) < 1e-2


def _decode(worker, prompts, tables, active: list[int]):
    """Prefill every prompt, then one greedy decode step per entry of `active`, of that many
    sequences (the first ones); returns every step's sampled ids."""
    from tests.reference import greedy

    lens = [len(p) for p in prompts]
    n = len(prompts)
    out = [worker.execute(_step(sum(prompts, []), lens, lens, tables, sample_rows=list(range(n)),
                                params=[greedy(99)] * n, seeds=[0] * n, output_positions=[0] * n)).token_ids]
    ids = list(out[0])
    for k, b in enumerate(active, 1):
        lens[:b] = [x + 1 for x in lens[:b]]
        new = worker.execute(_step(ids[:b], [1] * b, lens[:b], tables[:b], sample_rows=list(range(b)),
                                   params=[greedy(99)] * b, seeds=[0] * b, output_positions=[k] * b,
                                   step_id=k)).token_ids
        ids[:b] = new
        out.append(new)
    return out


@torch.inference_mode()
def test_worker_decode_graphs_match_eager_across_buckets(small_ckpt):
    """The worker with graphs (up to 16, padded to 1/2/4/8/16) and without sample the same
    greedy tokens (fp32: no rounding ties) as the batch shrinks across every bucket boundary,
    through a batch too large for any graph and back; the padding rows leave the real
    sequences' KV cache alone (every later token depends on it)."""
    prompts = random_prompts(4096, [5 + 3 * i for i in range(18)])
    tables = [[i * 8 + j for j in range(8)] for i in range(18)]
    active = [18, 16, 16, 11, 9, 8, 8, 5, 4, 3, 2, 2, 1, 1, 18]
    eager = _decode(_worker(small_ckpt, "float32", 18 * 8, cuda_graph_max_batch=0), prompts, tables, active)
    worker = _worker(small_ckpt, "float32", 18 * 8, cuda_graph_max_batch=16)
    assert _decode(worker, prompts, tables, active) == eager
    assert sorted(worker.graphs.graphs) == [1, 2, 4, 8, 16]


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_stage_graphs_match_eager(small_ckpt, dtype):
    """PP=2 stages in one process: stage 0 (token ids in, hidden states out) and stage 1
    (hidden states in, logits out) replayed as graphs give their eager outputs."""
    from raypp.model.checkpoint import load_weights
    from raypp.model.config import ModelConfig
    from raypp.model.cuda_graph import DecodeGraphs
    from raypp.parallel.layout import make_layout
    from raypp.parallel.pipeline import build_stage_module

    cfg = ModelConfig.from_dir(small_ckpt)
    layout = make_layout(cfg, 1, 2)
    stages = []
    for s in range(2):
        stage = build_stage_module(cfg, layout, s, 0)
        load_weights(stage, small_ckpt, dtype, "cuda")
        stage.allocate_kv_cache(3 * 8 + 1, 16)
        stages.append((stage, DecodeGraphs(stage, 4, 8, 16, scratch_block=3 * 8)))
    prompts = random_prompts(4096, [7, 20, 33])
    lens = [len(p) for p in prompts]
    tables = [[i * 8 + j for j in range(8)] for i in range(3)]
    x = torch.tensor(sum(prompts, []), device="cuda")
    for stage, _ in stages:
        x = stage(x, AttentionMetadata.build(lens, lens, tables, 16))
    ids = x.argmax(-1)
    for _ in range(6):
        lens = [n + 1 for n in lens]
        meta = AttentionMetadata.build([1] * 3, lens, tables, 16).to("cuda")
        eager, replayed = ids, ids
        for stage, graphs in stages:
            eager = stage(eager, meta)
            replayed = graphs.run(replayed, lens, tables, graphs.batch_for([1] * 3, lens, False))
            # The padded batch (4 rows for 3) may take other cuBLAS kernels: other rounding.
            assert rel(replayed, eager) < {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
        ids = eager.argmax(-1)
    assert [sorted(g.graphs) for _, g in stages] == [[4], [4]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemv_matches_reference_at_1b_shapes(dtype):
    """kernels/fused_gemv.py at the 1b preset's batch-1 shapes, as the batch-1 graph launches
    them (programmatic dependent launch where available), against the unfused references."""
    from kernels import fused_gemv as fg
    from raypp.model.fused_decode import pdl_available

    pdl = pdl_available(torch.device("cuda"))
    h, nw = randn(1, 2048, dtype=dtype), randn(2048, dtype=dtype)
    cos, sin = rope_cos_sin(torch.tensor([777], device="cuda"), inv_frequencies(64, 5e5, None).cuda(), dtype)
    cache = randn(2, 64, 8, 64, dtype=dtype)
    ref_cache = cache.clone()
    slots = torch.tensor([41], device="cuda")
    w = randn(3072, 2048, dtype=dtype)
    out = fg.fused_gemv(h, w, fg.ROPE, norm=(nw, 1e-5), pdl=pdl, rope=(cos, sin, cache[0], cache[1], slots, 32, 8, 64))
    ref = fg.fused_gemv_ref(h, w, fg.ROPE, norm=(nw, 1e-5), rope=(cos, sin, ref_cache[0], ref_cache[1], slots, 32, 8, 64))
    assert rel(out, ref) < TOL[dtype] and rel(cache, ref_cache) < TOL[dtype]
    w = randn(16384, 2048, dtype=dtype)
    out = fg.fused_gemv(h, w, fg.SILU, norm=(nw, 1e-5), pair_offset=8192, pdl=pdl)
    assert rel(out, fg.fused_gemv_ref(h, w, fg.SILU, norm=(nw, 1e-5), pair_offset=8192)) < TOL[dtype]
    for n, k in ((2048, 2048), (2048, 8192)):
        x, w, res = randn(1, k, dtype=dtype), randn(n, k, dtype=dtype), randn(1, n, dtype=dtype)
        out = fg.fused_gemv(x, w, fg.RESIDUAL, out=res.clone(), pdl=pdl)
        assert rel(out, fg.fused_gemv_ref(x, w, fg.RESIDUAL, out=res.clone())) < TOL[dtype]
    w = randn(4096, 2048, dtype=dtype)
    out = fg.fused_gemv(h, w, fg.PLAIN, norm=(nw, 1e-5), out_dtype=torch.float32, pdl=pdl)
    assert out.dtype == torch.float32
    assert rel(out, fg.fused_gemv_ref(h, w, fg.PLAIN, norm=(nw, 1e-5), out_dtype=torch.float32)) < TOL[dtype]


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_graph_replays_its_eager_step_bitwise_in_bf16(small_ckpt, batch):
    """Why bf16 tokens with graphs differ from eager ones: rounding, not stale inputs.  A
    replay equals, bit for bit, the eager step of the same forward given the graph's context
    bound (`eager_meta`: where attention splits the context); so every index the step copies
    in reaches the graph.  Against the eager step with its own splits (what the worker runs
    without graphs) the logits differ only by bf16 rounding.  Batch 1 is the fused forward
    (fused_decode.py), batch 4 Transformer.forward on cuBLAS."""
    from raypp.model.cuda_graph import DecodeGraph
    from raypp.model.fused_decode import pdl_available

    model = _worker(small_ckpt, cuda_graph_max_batch=0).model
    assert next(model.parameters()).dtype == torch.bfloat16
    model.allocate_kv_cache(65, 16)
    graph = DecodeGraph(model, batch, max_blocks=8, block_size=16, scratch_block=64)
    assert graph.fused == (batch == 1) and graph.pdl == (batch == 1 and pdl_available(torch.device("cuda")))
    prompts = random_prompts(4096, [9 + 7 * i for i in range(batch)])
    lens = [len(p) for p in prompts]
    tables = [[i * 8 + j for j in range(8)] for i in range(batch)]
    ids = model(torch.tensor(sum(prompts, []), device="cuda"), AttentionMetadata.build(lens, lens, tables, 16)).argmax(-1)
    for _ in range(12):  # across a block boundary for the shortest prompt
        lens = [n + 1 for n in lens]
        replayed = graph(ids, lens, tables).clone()
        same_split = graph.forward(ids, graph.eager_meta(lens, tables, "cuda"))
        assert torch.equal(replayed, same_split)
        own = model(ids, AttentionMetadata.build([1] * batch, lens, tables, 16).to("cuda"))
        assert rel(replayed, own) < 5e-2  # bf16 rounding (the model's own bf16 error vs fp32 is 2-4e-2)
        ids = own.argmax(-1)


flashinfer_only = pytest.mark.skipif(not ops.HAS_FLASHINFER, reason="flashinfer-python is not installed")


@flashinfer_only
@pytest.mark.parametrize("q_heads", [16, 32])
def test_flashinfer_decode_matches_reference(q_heads):
    """ops.decode_attention on FlashInfer, planned from AttentionMetadata's page lists (the
    small and 1b presets' heads: 16 or 32 of 64 over 8 kv heads), against the reference;
    a second step with other lengths re-plans."""
    bs, kv_heads, dim = 16, 8, 64
    k, v = randn(64 * bs, kv_heads, dim, dtype=torch.bfloat16), randn(64 * bs, kv_heads, dim, dtype=torch.bfloat16)
    tables = torch.randperm(64)[:60].view(5, 12).tolist()
    with ops.use("flashinfer"):
        for lens in ([1, 17, 150, 191, 63], [2, 18, 151, 192, 64]):
            meta = AttentionMetadata.build([1] * 5, lens, tables, bs).to("cuda")
            q = randn(5, q_heads, dim, dtype=torch.bfloat16)
            out = ops.decode_attention(q, k, v, meta, dim ** -0.5)
            ref = paged_attention.paged_decode_attention_ref(q, k, v, meta.decode_tables, meta.decode_lens,
                                                             meta.decode_max_len, bs, dim ** -0.5)
            assert rel(out, ref) < TOL[torch.bfloat16]


@flashinfer_only
@torch.inference_mode()
def test_model_decode_on_flashinfer_matches_triton(small_ckpt):
    """The model's eager decode steps with FlashInfer's attention give Triton's logits up to
    bf16 rounding, both teacher-forced on the same tokens."""
    model = _worker(small_ckpt, cuda_graph_max_batch=0).model
    prompts = random_prompts(4096, [9, 30])
    lens = [len(p) for p in prompts]
    tables = [[i * 8 + j for j in range(8)] for i in range(2)]
    ids = model(torch.tensor(sum(prompts, []), device="cuda"), AttentionMetadata.build(lens, lens, tables, 16)).argmax(-1)
    for _ in range(8):
        lens = [n + 1 for n in lens]
        logits = {}
        for name in ("triton", "flashinfer"):
            with ops.use(name):
                logits[name] = model(ids, AttentionMetadata.build([1, 1], lens, tables, 16).to("cuda"))
        assert rel(logits["flashinfer"], logits["triton"]) < 2e-2
        ids = logits["triton"].argmax(-1)
