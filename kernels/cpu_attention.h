// Paged attention over the block tables, for a flat batch of decode rows and prefill chunks
// (included by cpu.cpp, one translation unit).  K/V are read straight out of the paged pool:
// the torch reference gathers every sequence's context into a padded copy first, on every layer.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu_math.h"

namespace {

// The raw pointers and strides both attention walks index with.
template <typename T>
struct Operands {
  Operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
           const at::Tensor& tables)
      : qp(q.data_ptr<T>()), kp(k.data_ptr<T>()), vp(v.data_ptr<T>()), op(out.data_ptr<T>()),
        tp(tables.data_ptr<int32_t>()), qs0(q.stride(0)), qs1(q.stride(1)), ks0(k.stride(0)), ks1(k.stride(1)),
        vs0(v.stride(0)), vs1(v.stride(1)), os0(out.stride(0)), os1(out.stride(1)), ts0(tables.stride(0)) {}
  const T *qp, *kp, *vp;
  T* op;
  const int32_t* tp;
  int64_t qs0, qs1, ks0, ks1, vs0, vs1, os0, os1, ts0;
};

// Asks for [p, p + bytes) in cache.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off);
}

// fn(j, row) for the first n tokens of a context, in order, a block of the table at a time (one
// table read per block); row is token j's row of `pool`, whose slots are `stride` elements apart.
// Blocks of a context lie anywhere in the pool, so the hardware prefetcher restarts at each one:
// while the walk reads a slot it asks for the same slot of the next block (`bytes` from `offset`
// elements into the row, the part the caller reads).
template <typename T, typename Fn>
inline void walk_context(const int32_t* table, int64_t n, int64_t block_size, const T* pool, int64_t stride,
                         int64_t offset, int64_t bytes, Fn&& fn) {
  for (int64_t j0 = 0; j0 < n; j0 += block_size) {
    const int64_t base = static_cast<int64_t>(table[j0 / block_size]) * block_size;
    const int64_t next = j0 + block_size < n ? static_cast<int64_t>(table[j0 / block_size + 1]) * block_size : -1;
    for (int64_t j = j0; j < std::min(j0 + block_size, n); ++j) {
      if (next >= 0) prefetch(pool + (next + j - j0) * stride + offset, bytes);
      fn(j, pool + (base + j - j0) * stride);
    }
  }
}

// Decode rows: row[i] of q attends to the first ctx[i] tokens of sequence seq[i].  This walk
// is bound by memory, not arithmetic: each K/V row is read once, for one query.  A work item
// is a row and a range of its kv heads (the whole row unless rows are fewer than threads): each context
// token's K (then V) for those heads is one contiguous run of memory, and a cache block's
// tokens are adjacent slots, so the walk streams through each block instead of striding
// across heads.  Every query head of a kv head's group (GQA) uses its K/V row while it is in
// L1.  The next block is prefetched while one is read: 32 rows of context 160 over 8 layers of
// the peers' checkpoint's shape (blocks shuffled in a pool larger than the cache), two threads,
// 6.0 ms against 8.9 without.
template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                      const at::Tensor& tables, const std::vector<int64_t>& row, const std::vector<int64_t>& seq,
                      const std::vector<int64_t>& ctx, int64_t block_size, double scale) {
  const int64_t rows = static_cast<int64_t>(row.size()), q_heads = q.size(1), dim = q.size(2), kv_heads = k.size(1);
  if (rows == 0) return;
  const int64_t group = q_heads / kv_heads;
  const int64_t parts = std::clamp<int64_t>((2 * at::get_num_threads() + rows - 1) / std::max<int64_t>(rows, 1),
                                            1, kv_heads);
  const Operands<T> o(q, k, v, out, tables);
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(q_heads * dim), acc(q_heads * dim), inv(q_heads), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / parts, t = row[i], part = item % parts, n = ctx[i];
      const int64_t h0 = part * kv_heads / parts, h1 = (part + 1) * kv_heads / parts, nh = (h1 - h0) * group;
      const int64_t heads_bytes = (h1 - h0) * dim * static_cast<int64_t>(sizeof(T));
      const int32_t* table = o.tp + seq[i] * o.ts0;
      scores.resize(nh * n);
      for (int64_t h = 0; h < nh; ++h) {
        const T* qrow = o.qp + t * o.qs0 + (h0 * group + h) * o.qs1;
        for (int64_t d = 0; d < dim; ++d) qf[h * dim + d] = static_cast<float>(qrow[d]) * static_cast<float>(scale);
      }
      // Pass 1: scores.
      walk_context(table, n, block_size, o.kp, o.ks0, h0 * o.ks1, heads_bytes, [&](int64_t j, const T* kslot) {
        for (int64_t h = 0; h < nh; ++h) scores[h * n + j] = dot(&qf[h * dim], kslot + (h0 + h / group) * o.ks1, dim);
      });
      for (int64_t h = 0; h < nh; ++h) inv[h] = softmax(&scores[h * n], n);
      // Pass 2: the softmax-weighted sum of V rows.
      std::fill(acc.begin(), acc.begin() + nh * dim, 0.f);
      walk_context(table, n, block_size, o.vp, o.vs0, h0 * o.vs1, heads_bytes, [&](int64_t j, const T* vslot) {
        for (int64_t h = 0; h < nh; ++h) axpy(&acc[h * dim], scores[h * n + j], vslot + (h0 + h / group) * o.vs1, dim);
      });
      for (int64_t h = 0; h < nh; ++h) {
        T* orow = o.op + t * o.os0 + (h0 * group + h) * o.os1;
        for (int64_t d = 0; d < dim; ++d) orow[d] = static_cast<T>(acc[h * dim + d] * inv[h]);
      }
    }
  });
}

// A prefill chunk: q rows [row0, row0 + rows) are sequence seq's last `rows` tokens of ctx.
struct Chunk {
  int64_t seq, row0, rows, ctx;
};

constexpr int64_t kKeyTile = 16;    // keys per transposed K tile: one 512-bit vector of scores
constexpr int64_t kQueryTile = 16;  // chunk rows per work item, every one reusing each K tile

// Prefill chunks are bound by arithmetic: every K/V row meets every later query of its
// sequence.  A work item is one kv head of a chunk (or of a range of its rows, when items would
// be fewer than twice the threads).  Its keys are transposed once, in tiles of 16 ([D][16]
// floats), so that a query's 16 scores are D vector multiply-adds with no horizontal sum, four
// queries at a time (independent accumulators hide the FMA latency); then each V row is read
// once per tile of 16 rows and added into every query of the tile that sees it.  Row i of a
// chunk sees the first ctx - rows + i + 1 keys (causal, after the cached prefix).  Exact
// two-pass softmax as in decode_attention.
template <typename T>
void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                       const at::Tensor& tables, const std::vector<Chunk>& chunks, int64_t block_size, double scale) {
  const int64_t q_heads = q.size(1), dim = q.size(2), kv_heads = k.size(1), group = q_heads / kv_heads;
  struct Item {
    int64_t chunk, head, row_begin, row_end;
  };
  std::vector<Item> items;
  const int64_t heads = static_cast<int64_t>(chunks.size()) * kv_heads;
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
    const int64_t row_tiles = (chunks[c].rows + kQueryTile - 1) / kQueryTile;
    const int64_t parts = std::clamp<int64_t>((2 * at::get_num_threads() + heads - 1) / heads, 1, row_tiles);
    for (int64_t g = 0; g < kv_heads; ++g)
      for (int64_t p = 0; p < parts; ++p)
        items.push_back({c, g, p * row_tiles / parts * kQueryTile,
                         std::min(chunks[c].rows, (p + 1) * row_tiles / parts * kQueryTile)});
  }
  const Operands<T> o(q, k, v, out, tables);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, inv, scores, kt;
    for (int64_t it = begin; it < end; ++it) {
      const Chunk& c = chunks[items[it].chunk];
      const int64_t g = items[it].head, before = c.ctx - c.rows;  // cached tokens ahead of the chunk
      const int32_t* table = o.tp + c.seq * o.ts0;
      auto slot = [&](int64_t j) { return static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size; };
      const int64_t keys = before + items[it].row_end;  // what the item's last row sees
      kt.resize((keys + kKeyTile - 1) / kKeyTile * kKeyTile * dim);
      for (int64_t j0 = 0; j0 < keys; j0 += kKeyTile) {
        float* tile = &kt[j0 * dim];
        for (int64_t jj = 0; jj < kKeyTile; ++jj) {
          if (j0 + jj < keys) {
            const T* krow = o.kp + slot(j0 + jj) * o.ks0 + g * o.ks1;
            for (int64_t d = 0; d < dim; ++d) tile[d * kKeyTile + jj] = static_cast<float>(krow[d]);
          } else {
            for (int64_t d = 0; d < dim; ++d) tile[d * kKeyTile + jj] = 0.f;
          }
        }
      }
      for (int64_t r0 = items[it].row_begin; r0 < items[it].row_end; r0 += kQueryTile) {
        const int64_t nrows = std::min(kQueryTile, items[it].row_end - r0), nv = nrows * group;
        const int64_t first = before + r0 + 1, n = first + nrows - 1;  // keys of the tile's first, last row
        // Query vector u = i * group + h: row r0 + i of the chunk, head g * group + h.
        qf.resize(nv * dim);
        for (int64_t u = 0; u < nv; ++u) {
          const T* qrow = o.qp + (c.row0 + r0 + u / group) * o.qs0 + (g * group + u % group) * o.qs1;
          for (int64_t d = 0; d < dim; ++d) qf[u * dim + d] = static_cast<float>(qrow[d]) * static_cast<float>(scale);
        }
        scores.resize(nv * n);
        for (int64_t j0 = 0; j0 < n; j0 += kKeyTile) {
          const float* tile = &kt[j0 * dim];
          const int64_t cnt = std::min(kKeyTile, n - j0);
          // Rows whose last key is before this tile skip it: row i sees keys < first + i.
          int64_t u = std::max<int64_t>(0, j0 - first + 1) * group;
          for (; u + 4 <= nv; u += 4) {
            float a[4][kKeyTile] = {};
            for (int64_t d = 0; d < dim; ++d) {
              const float* kr = tile + d * kKeyTile;
              const float q0 = qf[u * dim + d], q1 = qf[(u + 1) * dim + d];
              const float q2 = qf[(u + 2) * dim + d], q3 = qf[(u + 3) * dim + d];
#pragma omp simd
              for (int64_t jj = 0; jj < kKeyTile; ++jj) {
                a[0][jj] += q0 * kr[jj];
                a[1][jj] += q1 * kr[jj];
                a[2][jj] += q2 * kr[jj];
                a[3][jj] += q3 * kr[jj];
              }
            }
            for (int64_t w = 0; w < 4; ++w) std::memcpy(&scores[(u + w) * n + j0], a[w], cnt * sizeof(float));
          }
          for (; u < nv; ++u) {
            float a[kKeyTile] = {};
            for (int64_t d = 0; d < dim; ++d) {
              const float* kr = tile + d * kKeyTile;
              const float qd = qf[u * dim + d];
#pragma omp simd
              for (int64_t jj = 0; jj < kKeyTile; ++jj) a[jj] += qd * kr[jj];
            }
            std::memcpy(&scores[u * n + j0], a, cnt * sizeof(float));
          }
        }
        inv.resize(nv);
        for (int64_t u = 0; u < nv; ++u) inv[u] = softmax(&scores[u * n], first + u / group);
        acc.assign(nv * dim, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const T* vrow = o.vp + slot(j) * o.vs0 + g * o.vs1;
          for (int64_t u = std::max<int64_t>(0, j - first + 1) * group; u < nv; ++u)
            axpy(&acc[u * dim], scores[u * n + j], vrow, dim);
        }
        for (int64_t u = 0; u < nv; ++u) {
          T* orow = o.op + (c.row0 + r0 + u / group) * o.os0 + (g * group + u % group) * o.os1;
          for (int64_t d = 0; d < dim; ++d) orow[d] = static_cast<T>(acc[u * dim + d] * inv[u]);
        }
      }
    }
  });
}

// q [T, Hq, D]; k/v_cache [slots, Hkv, D]; block_tables [S, max_blocks] int32; seq_lens [S]
// int32, each sequence's context with its new tokens.  query_starts [S + 1] int32 cuts q into
// the sequences' new tokens (a prefill chunk attends causally to its cached prefix and to
// itself); without it every sequence has one new token (decode).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const std::optional<at::Tensor>& query_starts, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and the caches must be 3-d");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), "dtype mismatch");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables and lengths");
  const at::Tensor lens = seq_lens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  std::vector<int64_t> row, seq, ctx;  // decode rows
  std::vector<Chunk> chunks;           // sequences with several new tokens
  if (query_starts.has_value()) {
    const at::Tensor starts = query_starts->contiguous();
    TORCH_CHECK(starts.scalar_type() == at::kInt && starts.numel() == lens.numel() + 1, "query_starts: S + 1 int32");
    const int32_t* sp = starts.data_ptr<int32_t>();
    TORCH_CHECK(sp[lens.numel()] == q.size(0), "query_starts must cover q");
    for (int64_t s = 0; s < lens.numel(); ++s) {
      const int64_t new_tokens = sp[s + 1] - sp[s];
      TORCH_CHECK(new_tokens <= lp[s], "a sequence has more new tokens than context");
      if (new_tokens > 1) {
        chunks.push_back({s, sp[s], new_tokens, lp[s]});
      } else if (new_tokens == 1) {
        row.push_back(sp[s]);
        seq.push_back(s);
        ctx.push_back(lp[s]);
      }
    }
  } else {
    TORCH_CHECK(lens.numel() == q.size(0), "one context length per query row");
    for (int64_t s = 0; s < lens.numel(); ++s) {
      row.push_back(s);
      seq.push_back(s);
      ctx.push_back(lp[s]);
    }
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    decode_attention<scalar_t>(q, k_cache, v_cache, out, block_tables, row, seq, ctx, block_size, scale);
    prefill_attention<scalar_t>(q, k_cache, v_cache, out, block_tables, chunks, block_size, scale);
  });
  return out;
}

}  // namespace
