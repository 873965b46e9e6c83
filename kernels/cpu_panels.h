// Products of few rows (decode steps) against fp32 weights packed once into panels.
//
// A decode step's products have 1-64 rows: too few to hide the weight stream behind the
// arithmetic in oneDNN's kernels, which stall on memory at those sizes (at 32 rows they took
// 24-25 ms for a step's products that would take 17-20 ms at their in-cache FLOP rate).  Here
// every weight is read once, as a stream of panels of 32 output columns ([K][32], contiguous),
// and while one block of 128 k-steps is being multiplied the next block is prefetched, so the
// memory and the FMA units work at the same time.  Every product of the peers' 160M checkpoint
// back to back, two threads, against oneDNN: 0.84x its time at 1 row, 0.77-0.78x at 16-32 rows
// (benchmarks/cpu_kernels.py), level at 128; prefill-sized products stay on oneDNN.
//
// A panel may instead hold two weights side by side (gate and up of a SwiGLU MLP, 16 rows of
// each), and the store then writes silu(gate) * up: the MLP's first half in one pass.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"

namespace {
namespace panels {

// Two of these make a panel's row.  GCC's vector extension, not intrinsics: one source for
// every x86 level (AVX-512 runs it as one register; see `fast()` for where it pays).
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kWidth = 32;   // output columns per panel
constexpr int kTileRows = 12;    // 12 rows x 2 vectors = 24 accumulators of AVX-512's 32 registers
constexpr int64_t kBlock = 128;  // k-steps per block; the next block is prefetched during this one

// Whether this build keeps a tile's accumulators in registers (AVX-512): elsewhere they spill
// and oneDNN is the faster path.
constexpr bool fast() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

inline vec16 load(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc[MT][32] (+)= x[MT rows, k0..k1) . panel[k0..k1): the inner loop is 2 weight loads, MT
// broadcasts and 2*MT FMAs per k-step; the accumulators live in registers for a whole block.
template <int MT>
void tile(const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1, float* acc, bool first) {
  vec16 a0[MT], a1[MT];
  for (int m = 0; m < MT; ++m) {
    a0[m] = first ? vec16{} : load(acc + m * kWidth);
    a1[m] = first ? vec16{} : load(acc + m * kWidth + 16);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* w = panel + k * kWidth;
    const vec16 w0 = load(w), w1 = load(w + 16);
    // The same k-step of the next block: by the time it is needed it has arrived.  Past the
    // panel's end this touches the next panel, or nothing (a prefetch never faults).
    __builtin_prefetch(w + kBlock * kWidth);
    __builtin_prefetch(w + kBlock * kWidth + 16);
    for (int m = 0; m < MT; ++m) {
      const float xv = x[m * ldx + k];
      a0[m] += w0 * xv;
      a1[m] += w1 * xv;
    }
  }
  for (int m = 0; m < MT; ++m) {
    std::memcpy(acc + m * kWidth, &a0[m], sizeof(vec16));
    std::memcpy(acc + m * kWidth + 16, &a1[m], sizeof(vec16));
  }
}

inline void tile_rows(int rows, const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1,
                      float* acc, bool first) {
  switch (rows) {
#define RAYPP_TILE(n) \
  case n:             \
    return tile<n>(x, ldx, panel, k0, k1, acc, first);
    RAYPP_TILE(1) RAYPP_TILE(2) RAYPP_TILE(3) RAYPP_TILE(4) RAYPP_TILE(5) RAYPP_TILE(6)
    RAYPP_TILE(7) RAYPP_TILE(8) RAYPP_TILE(9) RAYPP_TILE(10) RAYPP_TILE(11) RAYPP_TILE(12)
#undef RAYPP_TILE
  }
}

// [P, K, 32] panels of w [N, K] (N zero-padded to 32s); with w2 (w's shape), panel p holds
// rows 16p..16p+15 of w in columns 0-15 and the same rows of w2 in 16-31.
inline void pack(const float* w, const float* w2, int64_t n, int64_t k, float* out) {
  const int64_t per = w2 == nullptr ? kWidth : kWidth / 2, count = (n + per - 1) / per;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* panel = out + p * k * kWidth;
      std::fill(panel, panel + k * kWidth, 0.f);
      for (int64_t j = 0; j < per && p * per + j < n; ++j) {
        const int64_t row = p * per + j;
        for (int64_t i = 0; i < k; ++i) panel[i * kWidth + j] = w[row * k + i];
        if (w2 != nullptr)
          for (int64_t i = 0; i < k; ++i) panel[i * kWidth + per + j] = w2[row * k + i];
      }
    }
  });
}

// y [M, n] = x [M, K] . W^T (+ bias), W as `pack` laid it out; with `swiglu` (a paired pack),
// y [M, n] = silu(x . w^T) * (x . w2^T).  Threads split the panels: each streams its own.
inline void product(const float* x, int64_t m_rows, int64_t k, const float* packed, int64_t panel_count,
                    const float* bias, bool swiglu, int64_t n, float* y) {
  const int64_t tiles = (m_rows + kTileRows - 1) / kTileRows, step = (m_rows + tiles - 1) / tiles;
  const int64_t per = swiglu ? kWidth / 2 : kWidth;
  at::parallel_for(0, panel_count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(m_rows * kWidth);
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = packed + p * k * kWidth;
      for (int64_t k0 = 0; k0 < k; k0 += kBlock)
        for (int64_t m0 = 0; m0 < m_rows; m0 += step)
          tile_rows(static_cast<int>(std::min(step, m_rows - m0)), x + m0 * k, k, panel, k0,
                    std::min(k, k0 + kBlock), acc.data() + m0 * kWidth, k0 == 0);
      const int64_t col0 = p * per, cols = std::min(per, n - col0);
      for (int64_t m = 0; m < m_rows; ++m) {
        const float* a = acc.data() + m * kWidth;
        float* out = y + m * n + col0;
        if (swiglu) {
          for (int64_t j = 0; j < cols; ++j) out[j] = a[j] / (1.f + fast_exp(-a[j])) * a[per + j];
        } else {
          for (int64_t j = 0; j < cols; ++j) out[j] = a[j] + (bias != nullptr ? bias[col0 + j] : 0.f);
        }
      }
    }
  });
}

}  // namespace panels
}  // namespace
