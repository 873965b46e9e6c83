"""Every Triton kernel in kernels/ against its torch reference, and the model through both.

Without a GPU the kernels run in Triton's interpreter (kernels/ turns TRITON_INTERPRET on
when torch sees no CUDA device), on small shapes; on a GPU host the same tests run compiled.
The interpreter's bfloat16 is not faithful (its tl.dot on bf16 returns garbage), so here
fp32 and fp16 are checked; tests/test_gpu.py checks bf16 on a GPU.
"""
import pytest
import torch

import kernels
from kernels import activation, cpu, fused_gemv, gemv, paged_attention, rmsnorm, rotary

if not kernels.HAS_TRITON:
    pytest.skip("triton is not installed (pip install -e '.[dev]' brings it)", allow_module_level=True)
if not torch.cuda.is_available() and not kernels.INTERPRETED:
    pytest.skip("triton was imported before kernels/ could switch on its interpreter; "
                "run with TRITON_INTERPRET=1", allow_module_level=True)
from raypp.model import ops
from raypp.model.attention import AttentionMetadata
from raypp.model.rope import inv_frequencies, rope_cos_sin
from tests.kernel_cases import paged_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # relative: ||out - ref|| / ||ref||


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def assert_close(out, ref, dtype):
    assert torch.isfinite(out).all()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (5, 48), (3, 200)])
def test_rms_norm(rows, dim, dtype):
    x, w = rand(rows, dim, dtype=dtype, seed=1), rand(dim, dtype=dtype, seed=2)
    assert_close(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    x, res, w = rand(7, 96, dtype=dtype, seed=3), rand(7, 96, dtype=dtype, seed=4), rand(96, dtype=dtype, seed=5)
    out, new_res = rmsnorm.add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = rmsnorm.add_rms_norm_ref(x, res, w, 1e-5)
    assert_close(new_res, ref_res, dtype)
    assert_close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g, u = rand(9, 333, dtype=dtype, seed=6), rand(9, 333, dtype=dtype, seed=7)
    assert_close(activation.silu_and_mul(g, u), activation.silu_and_mul_ref(g, u), dtype)
    # The two halves of one fused gate/up product: strided rows.
    g, u = rand(4, 2 * 300, dtype=dtype, seed=12).split(300, dim=-1)
    assert_close(activation.silu_and_mul(g, u), activation.silu_and_mul_ref(g, u), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 16), (6, 2, 64)])
def test_rope_and_cache(q_heads, kv_heads, head_dim, dtype):
    positions = torch.tensor([0, 7, 3, 100, 2047], device=DEVICE)
    cos, sin = rope_cos_sin(positions, inv_frequencies(head_dim, 10000.0, None).to(DEVICE), dtype)
    # Strided views, as the model passes each projection's output reshaped to heads.
    q = rand(5, q_heads * head_dim + 8, dtype=dtype, seed=8)[:, : q_heads * head_dim].view(5, q_heads, head_dim)
    k = rand(5, kv_heads * head_dim, dtype=dtype, seed=9).view(5, kv_heads, head_dim)
    v = rand(5, kv_heads * head_dim, dtype=dtype, seed=10).view(5, kv_heads, head_dim)
    slots = torch.tensor([12, 0, 5, 30, 6], device=DEVICE)
    cache = rand(2, 32, kv_heads, head_dim, dtype=dtype, seed=11)  # random: untouched slots must stay
    ref_cache = cache.clone()
    out = rotary.rope_and_cache(q, k, v, cos, sin, cache[0], cache[1], slots)
    ref = rotary.rope_and_cache_ref(q, k, v, cos, sin, ref_cache[0], ref_cache[1], slots)
    assert_close(out, ref, dtype)
    assert_close(cache, ref_cache, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(70, 300, False), (8, 2500, True)])
def test_gemv(n, k, bias, dtype):
    x, w = rand(1, k, dtype=dtype, seed=13), rand(n, k, dtype=dtype, seed=14)
    b = rand(n, dtype=dtype, seed=15) if bias else None
    assert_close(gemv.gemv(x, w, b), gemv.gemv_ref(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain", "residual", "silu", "rope"])
@pytest.mark.parametrize("norm,bias", [(False, False), (True, True)])
def test_fused_gemv(mode, norm, bias, dtype):
    """Each fused batch-1 product (kernels/fused_gemv.py) against the unfused references,
    with and without its RMSNorm prologue; K not a multiple of the tile."""
    k = 200
    x = rand(1, k, dtype=dtype, seed=30)
    nrm = (rand(k, dtype=dtype, seed=31), 1e-5) if norm else None
    kw, ref_kw = {}, {}
    if mode == "plain":
        n, m = 44, fused_gemv.PLAIN
        kw = ref_kw = dict(out_dtype=torch.float32)
    elif mode == "residual":
        n, m = 44, fused_gemv.RESIDUAL
        h = rand(1, n, dtype=dtype, seed=32)
        kw, ref_kw = dict(out=h.clone()), dict(out=h.clone())
    elif mode == "silu":
        n, m = 2 * 20 + 6, fused_gemv.SILU  # gate and up halves of 20 rows, then rows no one reads
        kw = ref_kw = dict(pair_offset=20)
    else:
        q_heads, kv_heads, hd = 4, 2, 16
        n, m = (q_heads + 2 * kv_heads) * hd, fused_gemv.ROPE
        cos, sin = rope_cos_sin(torch.tensor([37], device=DEVICE), inv_frequencies(hd, 1e4, None).to(DEVICE), dtype)
        cache = rand(2, 24, kv_heads, hd, dtype=dtype, seed=33)  # random: untouched slots must stay
        ref_cache = cache.clone()
        slots = torch.tensor([13], device=DEVICE)
        kw = dict(rope=(cos, sin, cache[0], cache[1], slots, q_heads, kv_heads, hd))
        ref_kw = dict(rope=(cos, sin, ref_cache[0], ref_cache[1], slots, q_heads, kv_heads, hd))
    w = rand(n, k, dtype=dtype, seed=34)
    b = rand(n, dtype=dtype, seed=35) if bias else None
    out = fused_gemv.fused_gemv(x, w, m, norm=nrm, bias=b, **kw)
    ref = fused_gemv.fused_gemv_ref(x, w, m, norm=nrm, bias=b, **ref_kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype)
    if mode == "rope":
        assert_close(cache, ref_cache, dtype)


def paged_case(lens, q_heads, kv_heads, head_dim, block_size, dtype, seed):
    """A cache of random data (unused slots too), block tables of shuffled blocks, and queries."""
    k, v, tables = paged_cache(lens, kv_heads, head_dim, block_size, dtype, seed, DEVICE)
    q = rand(len(lens), q_heads, head_dim, dtype=dtype, seed=seed + 3)
    return (q, k, v, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE), max(lens),
            block_size, head_dim ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,q_heads,kv_heads,head_dim,block_size", [
    ([1, 5, 17], 4, 4, 16, 4),        # MHA, a context of one token, blocks smaller than the tile
    ([70, 3, 130], 8, 2, 32, 16),     # GQA 4:1, contexts crossing the 64-token tile
    ([33], 16, 8, 64, 16),            # the tiny/small presets' head shapes, batch 1
])
def test_paged_decode_attention(lens, q_heads, kv_heads, head_dim, block_size, dtype):
    args = paged_case(lens, q_heads, kv_heads, head_dim, block_size, dtype, seed=len(lens) + q_heads)
    out = paged_attention.paged_decode_attention(*args)
    assert_close(out, paged_attention.paged_decode_attention_ref(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_split_context(dtype):
    """Flash-decoding: the context split over 4 programs, one sequence so short that three
    of its splits are empty."""
    args = paged_case([300, 20], 8, 2, 32, 16, dtype, seed=21)
    out = paged_attention.paged_decode_attention(*args, splits=4)
    assert_close(out, paged_attention.paged_decode_attention_ref(*args), dtype)


def test_default_backend_on_cpu_is_not_triton_and_can_be_forced():
    default = "cpu" if cpu.available() else "torch"  # the C++ kernels where they build (tests/test_cpu_kernels.py)
    assert ops.backend(torch.device("cpu")) == default
    with ops.use("triton"):
        assert ops.backend(torch.device("cpu")) == "triton"
        assert ops.backend(torch.device("cpu"), attention=True) == "triton"
    assert ops.backend(torch.device("cpu"), attention=True) == default


def load_model(path, dtype, device):
    from raypp.model.checkpoint import load_weights
    from raypp.model.config import ModelConfig
    from raypp.model.llama import Transformer

    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, path, dtype, device)
    model.allocate_kv_cache(num_blocks=16, block_size=16)
    return model


@torch.inference_mode()
def run_steps(model, prompts, decode_steps):
    """Prefill every prompt in one step, then decode_steps greedy steps; every step's logits."""
    tables = [[i * 8 + j for j in range(8)] for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    device = model.lm_head.weight.device
    ids, logits = torch.tensor(sum(prompts, []), device=device), []
    query = lens
    for _ in range(decode_steps + 1):
        meta = AttentionMetadata.build(query, lens, tables, block_size=16)
        out = model(ids, meta)
        logits.append(out)
        ids, query = out.argmax(-1), [1] * len(prompts)
        lens = [n + 1 for n in lens]
    return logits


@pytest.mark.parametrize("prompts", [[[5, 9, 200, 31, 7], [44, 3, 3, 1000, 17, 18, 19, 20, 600]],
                                     [[8, 1500, 77]]], ids=["batch2", "batch1-gemv"])
def test_model_through_triton_kernels_matches_torch_path(tiny_ckpt, prompts):
    """The dispatch point, both ways: a prefill step (rmsnorm, rope + cache write, silu) and
    decode steps (the paged kernel; at batch 1 the GEMV) of the tiny model give the same
    logits through kernels and references; so do the fused q/k/v and gate/up products that
    CUDA loads use."""
    model = load_model(tiny_ckpt, torch.float32, DEVICE)
    with ops.use("torch"):
        ref = run_steps(model, prompts, decode_steps=2)
    if DEVICE == "cpu":
        model.fuse_projections()  # a CUDA load has done it already
    model.allocate_kv_cache(num_blocks=16, block_size=16)
    with ops.use("triton"):
        out = run_steps(model, prompts, decode_steps=2)
    for o, r in zip(out, ref):
        assert (o - r).abs().max().item() < 1e-4


@torch.inference_mode()
def test_fused_batch1_decode_matches_model(tiny_ckpt):
    """raypp/model/fused_decode.py (what the batch-1 CUDA graph runs) gives the logits and
    the KV cache of Transformer.forward on the Triton kernels, step after step."""
    from raypp.model import fused_decode

    model = load_model(tiny_ckpt, torch.float32, DEVICE)
    if DEVICE == "cpu":
        model.fuse_projections()
    assert fused_decode.eligible(model)
    prompt, tables = [8, 1500, 77, 5], [[3, 1]]
    runs = {}
    for fused in (False, True):
        model.allocate_kv_cache(num_blocks=16, block_size=16)
        with ops.use("triton"):
            ids = model(torch.tensor(prompt, device=DEVICE), AttentionMetadata.build([4], [4], tables, 16)).argmax(-1)
            logits = []
            for n in range(5, 8):
                meta = AttentionMetadata.build([1], [n], tables, 16).to(DEVICE)
                out = fused_decode.forward(model, ids, meta) if fused else model(ids, meta)
                logits.append(out)
                ids = out.argmax(-1)
        runs[fused] = logits, model.layers["0"].self_attn.kv_cache.clone()
    for o, r in zip(runs[True][0], runs[False][0]):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert (o - r).abs().max().item() < 1e-4
    assert (runs[True][1] - runs[False][1]).abs().max().item() < 1e-5
