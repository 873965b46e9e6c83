"""The CPU kernels (kernels/cpu.cpp) against their torch references, and the model through both.

The build needs g++ (as on CI); where it exists these tests require the kernels to build.
Contexts are random data in shuffled blocks, unused slots included, so a kernel that reads
past a context or through the wrong table entry shows.
"""
import shutil

import pytest
import torch

from kernels import activation, cpu, paged_attention, rmsnorm, rotary
from raypp.model import ops
from raypp.model.attention import AttentionMetadata
from tests.kernel_cases import paged_cache

if shutil.which("g++") is None:
    pytest.skip("no g++: the CPU kernels cannot be built here", allow_module_level=True)
assert cpu.available(), "the CPU kernels failed to build (see the warning above)"

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative: ||out - ref|| / ||ref||
DTYPES = list(TOL)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (5, 48), (3, 7, 200), (33, 1024)])
def test_rms_norm(shape, dtype):
    x, w = rand(*shape, dtype=dtype, seed=1), rand(shape[-1], dtype=dtype, seed=2)
    assert_close(cpu.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 256), (7, 96), (40, 1024)])
def test_add_rms_norm(shape, dtype):
    x, res = rand(*shape, dtype=dtype, seed=3), rand(*shape, dtype=dtype, seed=4)
    w = rand(shape[-1], dtype=dtype, seed=5)
    out, new_res = cpu.add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = rmsnorm.add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(new_res, ref_res)  # the sum is rounded once, as the reference rounds it
    assert_close(out, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g, u = rand(9, 333, dtype=dtype, seed=6) * 8, rand(9, 333, dtype=dtype, seed=7)  # * 8: exp's far tails
    assert_close(cpu.silu_and_mul(g, u), activation.silu_and_mul_ref(g, u), dtype)
    g, u = rand(2, 3, 2 * 300, dtype=dtype, seed=12).split(300, dim=-1)  # halves of one fused product
    assert_close(cpu.silu_and_mul(g, u), activation.silu_and_mul_ref(g, u), dtype)


DECODE_CASES = [  # lens, q_heads, kv_heads, head_dim, block_size
    ([1, 5, 17], 4, 4, 16, 4),             # MHA, a one-token context, contexts crossing blocks
    ([70, 3, 130, 64], 8, 2, 32, 16),      # GQA 4:1, one context exactly 4 blocks
    ([33], 16, 8, 64, 16),                 # the tiny/small presets' heads, batch 1
    ([300, 20, 1, 129], 32, 4, 128, 32),   # GQA 8:1, head_dim 128
    ([9, 40], 6, 6, 64, 1),                # one-token blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,q_heads,kv_heads,head_dim,block_size", DECODE_CASES)
def test_paged_decode_attention(lens, q_heads, kv_heads, head_dim, block_size, dtype):
    k, v, tables = paged_cache(lens, kv_heads, head_dim, block_size, dtype, seed=len(lens) + q_heads)
    q = rand(len(lens), q_heads, head_dim, dtype=dtype, seed=99)
    args = (q, k, v, tables, torch.tensor(lens, dtype=torch.int32), max(lens), block_size, head_dim ** -0.5)
    assert_close(cpu.paged_decode_attention(*args), paged_attention.paged_decode_attention_ref(*args), dtype)


def same_on_one_and_two_threads(kernel, args):
    """kernel(*args) on one thread, after asserting it equals the two-thread result bit for bit."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(*args)
        torch.set_num_threads(2)
        two = kernel(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    return one


@pytest.mark.parametrize("lens", [[70, 3, 130, 64], [130]])
def test_paged_decode_attention_same_on_one_and_two_threads(lens):
    """Rows fewer than twice the threads are split by kv heads too (batch 1: 2 parts on one
    thread, 4 on two); every head is computed whole by one thread either way."""
    k, v, tables = paged_cache(lens, 8, 32, 16, torch.float32, seed=5)
    q = rand(len(lens), 16, 32, seed=6)
    args = (q, k, v, tables, torch.tensor(lens, dtype=torch.int32), max(lens), 16, 32 ** -0.5)
    one = same_on_one_and_two_threads(cpu.paged_decode_attention, args)
    assert_close(one, paged_attention.paged_decode_attention_ref(*args), torch.float32)


MIXED_CASES = [  # (new tokens, context) per sequence, q_heads, kv_heads, head_dim, block_size
    ([(1, 9), (12, 12), (1, 33)], 4, 2, 16, 4),              # decodes around a whole prompt
    ([(5, 40), (1, 17), (30, 30), (1, 1), (16, 50)], 8, 2, 32, 16),  # chunks over cached prefixes
    ([(64, 64)], 16, 8, 64, 16),                             # one prompt (the small preset's heads)
    ([(7, 100), (1, 64), (3, 3)], 12, 3, 64, 32),            # GQA 4:1, a chunk crossing 3 blocks
    ([(37, 90), (2, 2), (1, 20)], 3, 1, 40, 5),              # 3 query tiles, head_dim 40, 5-token blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqs,q_heads,kv_heads,head_dim,block_size", MIXED_CASES)
def test_mixed_batch_attention_matches_reference_route(seqs, q_heads, kv_heads, head_dim, block_size, dtype):
    """ops.attention on a flat batch of decodes and (chunked) prefills: the CPU kernel's one
    call against the references' decode batch plus one masked SDPA per prefill."""
    query_lens, lens = [q for q, _ in seqs], [n for _, n in seqs]
    k, v, tables = paged_cache(lens, kv_heads, head_dim, block_size, dtype, seed=sum(lens))
    meta = AttentionMetadata.build(query_lens, lens, tables.tolist(), block_size)
    q = rand(sum(query_lens), q_heads, head_dim, dtype=dtype, seed=7)
    with ops.use("torch"):
        ref = ops.attention(q, k, v, meta, head_dim ** -0.5)
    with ops.use("cpu"):
        out = ops.attention(q, k, v, meta, head_dim ** -0.5)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim", [(1, 16, 8, 64), (37, 6, 2, 32), (5, 4, 4, 128)])
def test_rope_and_cache_equals_its_reference(tokens, q_heads, kv_heads, head_dim, dtype):
    """Rotated q returned, rotated k and v written at their slots, every other slot untouched;
    k and v are the strided column slices of one fused product, as the model hands them over."""
    from raypp.model.rope import inv_frequencies, rope_cos_sin
    qkv = rand(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=41)
    q, k, v = (y.view(tokens, -1, head_dim) for y in qkv.split([q_heads * head_dim, kv_heads * head_dim,
                                                                 kv_heads * head_dim], dim=-1))
    positions = torch.randint(0, 500, (tokens,), generator=torch.Generator().manual_seed(42))
    cos, sin = rope_cos_sin(positions, inv_frequencies(head_dim, 10000.0, None), dtype)
    slots = torch.randperm(3 * tokens, generator=torch.Generator().manual_seed(43))[:tokens]
    caches = [rand(2, 3 * tokens, kv_heads, head_dim, dtype=dtype, seed=44) for _ in range(2)]
    ref = rotary.rope_and_cache_ref(q, k, v, cos, sin, caches[0][0], caches[0][1], slots)
    out = cpu.rope_and_cache(q, k, v, cos, sin, caches[1][0], caches[1][1], slots)
    assert_close(out, ref, dtype)
    assert_close(caches[1], caches[0], dtype)
    assert torch.equal(caches[1][1], caches[0][1])  # v is copied, not computed


def test_prefill_chunks_same_on_one_and_two_threads():
    """With fewer chunk-heads than twice the threads a chunk's rows are split between items;
    every row is still computed whole by one of them."""
    k, v, tables = paged_cache([100], 1, 32, 16, torch.float32, seed=8)
    meta = AttentionMetadata.build([70], [100], tables.tolist(), 16)
    q = rand(70, 4, 32, seed=9)
    args = (q, k, v, meta.tables, meta.seq_lens, meta.query_starts, 16, 32 ** -0.5)
    one = same_on_one_and_two_threads(cpu.paged_attention, args)
    p = meta.prefills[0]
    assert_close(one, paged_attention.paged_prefill_attention_ref(q, k, v, p.slots, p.mask, 32 ** -0.5), torch.float32)


def test_prefill_chunk_equals_its_reference():
    """One chunk over a cached prefix, against paged_prefill_attention_ref directly."""
    k, v, tables = paged_cache([45], 2, 16, 8, torch.float32, seed=3)
    meta = AttentionMetadata.build([13], [45], tables.tolist(), 8)
    q = rand(13, 6, 16, seed=4)
    p = meta.prefills[0]
    ref = paged_attention.paged_prefill_attention_ref(q, k, v, p.slots, p.mask, 0.25)
    out = cpu.paged_attention(q, k, v, meta.tables, meta.seq_lens, meta.query_starts, 8, 0.25)
    assert_close(out, ref, torch.float32)


def test_missing_compiler_falls_back_with_a_warning(tmp_path):
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert cpu.build(cxx="no-such-g++", cache_dir=tmp_path) is None


def test_failed_build_falls_back_with_a_warning(tmp_path):
    with pytest.warns(RuntimeWarning, match="building the CPU kernels failed"):
        assert cpu.build(cxx="false", cache_dir=tmp_path) is None  # a "compiler" that always fails
    assert not list(tmp_path.glob("*.so*"))  # nothing half-built left for the next process


def test_dispatch_picks_the_cpu_kernels_and_can_be_forced(monkeypatch):
    assert ops.backend(torch.device("cpu")) == "cpu"
    assert ops.backend(torch.device("cpu"), attention=True) == "cpu"
    with ops.use("torch"):
        assert ops.backend(torch.device("cpu")) == "torch"
    monkeypatch.setattr(cpu, "_loaded", False)  # as after a failed build: the references run
    assert ops.backend(torch.device("cpu"), attention=True) == "torch"
    with pytest.raises(RuntimeError, match="not built"):
        with ops.use("cpu"):
            pass


@torch.inference_mode()
def test_model_through_cpu_kernels_matches_torch_path(tiny_ckpt):
    """The tiny model, a prefill of two prompts, then a chunked prefill next to decodes, then
    decodes: the same logits through the CPU kernels as through the references."""
    from raypp.model.checkpoint import load_weights
    from raypp.model.config import ModelConfig
    from raypp.model.llama import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dir(tiny_ckpt))
    load_weights(model, tiny_ckpt, torch.float32, "cpu")
    tables = [[i * 8 + j for j in range(8)] for i in range(3)]
    steps = [  # (sequences, new tokens, context lengths) per step
        ([0, 1], [20, 9], [20, 9]),
        ([0, 1, 2], [1, 1, 18], [21, 10, 18]),       # the third prompt's first chunk
        ([2, 0, 1], [17, 1, 1], [35, 22, 11]),       # its second chunk over the cached prefix
        ([0, 1, 2], [1, 1, 1], [23, 12, 36]),
    ]
    logits = {}
    for name in ("torch", "cpu"):
        model.allocate_kv_cache(num_blocks=24, block_size=16)
        ids = torch.arange(3, 3 + 40)
        with ops.use(name):
            logits[name] = [model(ids[: sum(q)], AttentionMetadata.build(q, n, [tables[s] for s in seqs], 16))
                            for seqs, q, n in steps]
    for out, ref in zip(logits["cpu"], logits["torch"]):
        assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 96, 64, False),     # batch-1 decode
    (5, 192, 64, True),     # a micro-batch, with a bias (qkv_bias models)
    (33, 64, 160, False),   # more rows than the packing's hint
    (300, 128, 96, False),  # a prefill chunk
])
def test_packed_linear_equals_f_linear(dtype, rows, out_features, in_features, bias):
    from kernels import cpu_linear
    if not cpu_linear.available(dtype):
        pytest.skip(f"this torch build cannot pack {dtype} weights for oneDNN")
    x, w = rand(rows, in_features, dtype=dtype, seed=31), rand(out_features, in_features, dtype=dtype, seed=32)
    b = rand(out_features, dtype=dtype, seed=33) if bias else None
    cpu_linear.pack(w)
    assert_close(cpu_linear.linear(x, w, b), torch.nn.functional.linear(x, w, b), dtype)


@pytest.mark.parametrize("rows", [1, 2, 12, 13, 25, 64])
@pytest.mark.parametrize("out_features,in_features", [(40, 37), (96, 300), (17, 129)])
def test_panel_products_equal_their_references(rows, out_features, in_features):
    """The decode-sized products: partial panels (N not a multiple of 32, of 16 when paired),
    K across prefetch blocks (128) or not a multiple of the vector, row tiles split unevenly."""
    if not torch.ops.raypp_cpu.panels_fast():
        pytest.skip("this build runs decode products on oneDNN (no AVX-512)")
    x = rand(rows, in_features, seed=41) * 3
    w, w2 = (rand(out_features, in_features, seed=s) for s in (42, 43))
    b = rand(out_features, seed=44)
    assert_close(cpu.panel_linear(x, cpu.pack_panels(w), out_features), torch.nn.functional.linear(x, w),
                 torch.float32)
    assert_close(cpu.panel_linear(x, cpu.pack_panels(w), out_features, b), torch.nn.functional.linear(x, w, b),
                 torch.float32)
    ref = activation.silu_and_mul_ref(torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w2))
    assert_close(cpu.panel_linear(x, cpu.pack_panels(w, w2), out_features, swiglu=True), ref, torch.float32)
    # a strided input (the attention output's reshape, a slice) reads the same values
    wide = rand(rows, 2 * in_features, seed=45)
    assert_close(cpu.panel_linear(wide[:, ::2], cpu.pack_panels(w), out_features),
                 torch.nn.functional.linear(wide[:, ::2], w), torch.float32)


def test_decode_products_take_the_panels_and_prefills_onednn(monkeypatch):
    from kernels import cpu_linear
    if not torch.ops.raypp_cpu.panels_fast():
        pytest.skip("this build runs decode products on oneDNN (no AVX-512)")
    w, gate, up = (rand(64, 48, seed=s) for s in (46, 47, 48))
    cpu_linear.pack(w)
    cpu_linear.pack_swiglu(gate, up)
    calls = []
    monkeypatch.setattr(cpu, "panel_linear", lambda *a, **k: calls.append(a[0].shape[0]) or torch.zeros(1))
    for rows in (1, cpu_linear.PANEL_ROWS, cpu_linear.PANEL_ROWS + 1, 300):
        cpu_linear.linear(rand(rows, 48), w, None)
        cpu_linear.swiglu(rand(rows, 48), gate, up)
    assert calls == [1, 1, cpu_linear.PANEL_ROWS, cpu_linear.PANEL_ROWS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_swiglu_products_equal_their_reference(dtype, rows):
    """SiLU and the product as oneDNN post-ops == silu_and_mul of two plain products."""
    from kernels import cpu_linear
    if not cpu_linear.available(dtype):
        pytest.skip(f"this torch build cannot pack {dtype} weights for oneDNN")
    x = rand(rows, 96, dtype=dtype, seed=35) * 4  # * 4: SiLU's tails on both sides
    gate, up = rand(160, 96, dtype=dtype, seed=36), rand(160, 96, dtype=dtype, seed=37)
    ref = activation.silu_and_mul_ref(torch.nn.functional.linear(x, gate), torch.nn.functional.linear(x, up))
    cpu_linear.pack_swiglu(gate, up)
    assert_close(ops.swiglu(x, gate, up), ref, dtype)
    with ops.use("torch"):  # the reference route of the same call
        assert_close(ops.swiglu(x, gate, up), ref, dtype)


def test_loaded_cpu_weights_are_packed_and_the_torch_path_ignores_them(tiny_ckpt):
    from kernels import cpu_linear
    from raypp.model.checkpoint import load_weights
    from raypp.model.config import ModelConfig
    from raypp.model.llama import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dir(tiny_ckpt))
    load_weights(model, tiny_ckpt, torch.float32, "cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(cpu_linear.packed_of(m.weight) is not None for m in linears)
    x = rand(3, model.cfg.hidden_size, seed=34)
    w = model.layers["0"].mlp.gate_proj.weight
    with ops.use("torch"):
        assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))


def test_products_run_at_few_row_counts_with_little_padding():
    """oneDNN caches a kernel per shape: every token count up to 4096 maps onto 31 row counts."""
    from kernels.cpu_linear import padded_rows
    sizes = {r: padded_rows(r) for r in range(1, 4097)}
    assert len(set(sizes.values())) == 31
    assert all(p >= r and (r <= 64 or p <= 1.25 * r) for r, p in sizes.items())


def test_a_long_prefill_mlp_in_pieces_equals_it_whole():
    from kernels import cpu_linear
    if not cpu_linear.available(torch.float32):
        pytest.skip("this torch build cannot pack fp32 weights for oneDNN")
    x = rand(2 * ops.MLP_ROWS + 77, 64, seed=51)
    gate, up, down = rand(96, 64, seed=52), rand(96, 64, seed=53), rand(64, 96, seed=54)
    ops.pack_linears([down], [(gate, up)])
    with ops.use("torch"):
        ref = ops.mlp(x, gate, up, down)
    assert_close(ops.mlp(x, gate, up, down), ref, torch.float32)
