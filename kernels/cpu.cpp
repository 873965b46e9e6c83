// raypp's CPU kernels, built by kernels/cpu.py with the host's C++ compiler and loaded as
// torch.ops.raypp_cpu.*.  Each one has a plain-torch reference in kernels/*.py that it must
// equal (tests/test_cpu_kernels.py).
//
// Attention is in cpu_attention.h, the arithmetic they share in cpu_math.h.  Products
// accumulate in fp32 whatever the storage dtype.  Work is spread with at::parallel_for, so
// torch.set_num_threads governs these kernels like torch's own.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_allreduce.h"
#include "cpu_attention.h"
#include "cpu_math.h"
#include "cpu_panels.h"

namespace {

// (rms_norm(x + residual), x + residual), or rms_norm(x) without a residual, in one pass over
// the row: the references' order of rounding (sum rounded to the storage dtype, normalised in
// fp32, rounded again, then scaled by the weight).
template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows, int64_t d, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(d);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d;
      double ss = 0.;
      if (res != nullptr) {
        for (int64_t i = 0; i < d; ++i) {
          const T sum = static_cast<T>(static_cast<float>(res[r * d + i]) + static_cast<float>(xr[i]));
          res_out[r * d + i] = sum;
          h[i] = static_cast<float>(sum);
        }
      } else {
        for (int64_t i = 0; i < d; ++i) h[i] = static_cast<float>(xr[i]);
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) ss += h[i] * h[i];
      const float rstd = static_cast<float>(1. / std::sqrt(ss / static_cast<double>(d) + eps));
      for (int64_t i = 0; i < d; ++i)
        out[r * d + i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(static_cast<T>(h[i] * rstd)));
    }
  });
}

std::vector<at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                 const at::Tensor& weight, double eps) {
  const at::Tensor xc = x.contiguous(), w = weight.to(x.scalar_type()).contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(w.numel() == d, "weight must have the row's size");
  at::Tensor out = at::empty_like(xc);
  at::Tensor res, res_out;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual like x");
    res = residual->contiguous();
    res_out = at::empty_like(xc);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            res_out.defined() ? res_out.data_ptr<scalar_t>() : nullptr, rows, d, eps);
  });
  if (res_out.defined()) return {out, res_out};
  return {out};
}

// silu(gate) * up, row by row; gate and up may be the strided halves of one fused product.
template <typename T>
void silu_and_mul_rows(const T* gate, const T* up, T* out, int64_t rows, int64_t n, int64_t gs, int64_t us) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float x = static_cast<float>(gate[r * gs + i]);
        // Rounded to the storage dtype before the product, as F.silu(gate) * up rounds.
        const float s = static_cast<float>(static_cast<T>(x / (1.f + fast_exp(-x))));
        out[r * n + i] = static_cast<T>(s * static_cast<float>(up[r * us + i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate and up must match");
  const int64_t n = gate.size(-1), rows = n ? gate.numel() / n : 0;
  const at::Tensor g = gate.stride(-1) == 1 ? gate.reshape({rows, n}) : gate.contiguous().view({rows, n});
  const at::Tensor u = up.stride(-1) == 1 ? up.reshape({rows, n}) : up.contiguous().view({rows, n});
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n,
                                g.stride(0), u.stride(0));
  });
  return out;
}

// Rotary embedding (Hugging Face's half-split layout) of q and k, fused with the cache write
// that follows it: one pass over the step's q/k/v instead of the reference's seven (two
// rotations of mul, cat, neg, mul, add each, then two index_copy_ into the pool).  cos/sin are
// [T, D] with equal halves (raypp/model/rope.py).  Arithmetic in the storage dtype's order:
// x * cos + rotated * sin, each product and the sum rounded as the reference rounds them.
template <typename T>
inline void rotate(const T* x, const T* c, const T* s, T* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const T lo = x[i], hi = x[i + half];
    out[i] = static_cast<T>(static_cast<T>(lo * c[i]) + static_cast<T>(-hi * s[i]));
    out[i + half] = static_cast<T>(static_cast<T>(hi * c[i + half]) + static_cast<T>(lo * s[i + half]));
  }
}

at::Tensor rope_and_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q, k, v and the caches must be 3-d");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(2) == 1 &&
                  v_cache.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == k_cache.size(1) && q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "q [T, Hq, D], k/v [T, Hkv, D] and the caches [slots, Hkv, D] must agree");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == q.size(0), "one int64 slot per token");
  const at::Tensor c = cos.contiguous(), sn = sin.contiguous(), sl = slots.contiguous();
  TORCH_CHECK(c.dim() == 2 && c.size(0) == q.size(0) && c.size(1) == q.size(2) && sn.sizes() == c.sizes(),
              "cos/sin must be [T, D]");
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t tokens = q.size(0), qh = q.size(1), kh = k.size(1), d = q.size(2), half = d / 2;
  const int64_t* sp = sl.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_and_cache", [&] {
    TORCH_CHECK(c.scalar_type() == q.scalar_type() && k.scalar_type() == q.scalar_type() &&
                    k_cache.scalar_type() == q.scalar_type(), "dtype mismatch");
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *cp = c.data_ptr<scalar_t>(), *spn = sn.data_ptr<scalar_t>();
    scalar_t *op = out.data_ptr<scalar_t>(), *kc = k_cache.data_ptr<scalar_t>(), *vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t *ct = cp + t * d, *st = spn + t * d;
        const int64_t slot = sp[t];
        for (int64_t h = 0; h < qh; ++h)
          rotate(qp + t * q.stride(0) + h * q.stride(1), ct, st, op + (t * qh + h) * d, half);
        for (int64_t h = 0; h < kh; ++h) {
          rotate(kp + t * k.stride(0) + h * k.stride(1), ct, st, kc + slot * k_cache.stride(0) + h * k_cache.stride(1),
                 half);
          std::memcpy(vc + slot * v_cache.stride(0) + h * v_cache.stride(1), vp + t * v.stride(0) + h * v.stride(1),
                      d * sizeof(scalar_t));
        }
      }
    });
  });
  return out;
}

// fp32 weights packed for panels::product; w2 (w's shape) pairs gate with up.
at::Tensor pack_panels(const at::Tensor& w, const std::optional<at::Tensor>& w2) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_panels takes a 2-d fp32 weight");
  TORCH_CHECK(!w2.has_value() || (w2->sizes() == w.sizes() && w2->scalar_type() == at::kFloat),
              "the paired weight must match the first");
  const at::Tensor a = w.contiguous(), b = w2.has_value() ? w2->contiguous() : at::Tensor();
  const int64_t n = a.size(0), k = a.size(1), per = b.defined() ? panels::kWidth / 2 : panels::kWidth;
  at::Tensor out = at::empty({(n + per - 1) / per, k, panels::kWidth}, a.options());
  panels::pack(a.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, n, k, out.data_ptr<float>());
  return out;
}

// x [M, K] (fp32) times a packed weight of n output rows; `swiglu` for a paired pack.
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                        bool swiglu) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(1) == x.size(1) &&
                  packed.size(2) == panels::kWidth, "x [M, K] fp32 and panels [P, K, 32] must agree");
  TORCH_CHECK(!bias.has_value() || (!swiglu && bias->numel() == n && bias->scalar_type() == at::kFloat),
              "bias: n fp32 values, and none with swiglu");
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) > 0)
    panels::product(xc.data_ptr<float>(), x.size(0), x.size(1), pc.data_ptr<float>(), pc.size(0),
                    bc.defined() ? bc.data_ptr<float>() : nullptr, swiglu, n, y.data_ptr<float>());
  return y;
}

bool panels_fast() { return panels::fast(); }

}  // namespace

TORCH_LIBRARY(raypp_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor? query_starts, int block_size, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> Tensor[]");
  m.def("silu_and_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rope_and_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots) -> Tensor");
  m.def("pack_panels(Tensor w, Tensor? w2) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor packed, int n, Tensor? bias, bool swiglu) -> Tensor");
  m.def("panels_fast() -> bool", &panels_fast);
  m.def("shm_all_reduce(Tensor(a!) t, Tensor segment, int rank, int size, int round, int slot_bytes, "
        "float timeout_s) -> bool");
}

TORCH_LIBRARY_IMPL(raypp_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("pack_panels", &pack_panels);
  m.impl("panel_linear", &panel_linear);
  m.impl("shm_all_reduce", &shm_all_reduce);
}
