// Arithmetic shared by raypp's CPU kernels (included by cpu.cpp, one translation unit).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// exp for the softmax and SiLU loops: std::exp is a libm call that keeps those loops scalar;
// this (Cephes' expf: Cody-Waite reduction, degree-6 polynomial, exponent by bits) vectorises
// and is within 2 ulp.  Inputs are clamped to the finite range, so exp(-inf) is ~1e-38, not 0.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Softmax denominators and sums of squares accumulate in double: raypp's fp32 logits are
// pinned to transformers' within 1e-4, and the references' own rounding already uses most of
// that (8.5e-5 on the small preset's 64-token prefill; these kernels 9.0e-5, and 1.2e-4 with
// every sum in fp32).  A dot product of one head (D terms over 16 SIMD lanes) stays fp32.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename T>
inline void axpy(float* acc, float p, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += p * static_cast<float>(x[i]);
}

// s[0, n) <- exp(s - max s), unnormalised; returns 1 / their sum (accumulated in double).  The
// scores are kept whole, so the softmax is an exact two-pass one, not an online rescaling.
inline float softmax(float* s, int64_t n) {
  float m = -INFINITY;
  double sum = 0.;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = fast_exp(s[j] - m);
    sum += s[j];
  }
  return static_cast<float>(1. / sum);
}

}  // namespace
