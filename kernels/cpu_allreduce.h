// The shared-memory all-reduce of TP ranks on one host (raypp/parallel/shm_allreduce.py owns the
// segment and the protocol; this is its hot path, one call per all-reduce).  In Python the same
// steps cost ~80 us a call (views, copies, a polling loop), and a decode token of the peers'
// checkpoint makes 17 calls at TP=2; here a call is a copy, a flag and the partners' wait.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <sched.h>

#include <chrono>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kFlagStride = 8;  // int64s between round counters: one cache line each

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// out = out + part, rounded to T as torch's add_ rounds it.
template <typename T>
inline void add_into(T* out, const T* part, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(out[i]) + static_cast<float>(part[i]));
}

// Round `round` of the collective: write t into this rank's slot of the round's slot set, raise
// this rank's counter, wait for every counter to reach the round, then t = slot 0 + slot 1 + ...
// in rank order (the same bits on every rank).  False if a rank did not arrive within timeout_s.
inline bool shm_all_reduce(at::Tensor& t, const at::Tensor& segment, int64_t rank, int64_t size, int64_t round,
                           int64_t slot_bytes, double timeout_s) {
  TORCH_CHECK(t.is_contiguous() && t.nbytes() <= static_cast<size_t>(slot_bytes), "t: contiguous, within a slot");
  uint8_t* base = segment.data_ptr<uint8_t>();
  auto* flags = reinterpret_cast<int64_t*>(base);
  uint8_t* slots = base + size * kFlagStride * 8 + (round % 2) * size * slot_bytes;
  std::memcpy(slots + rank * slot_bytes, t.data_ptr(), t.nbytes());
  __atomic_store_n(&flags[rank * kFlagStride], round, __ATOMIC_RELEASE);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (int64_t r = 0, spins = 0; r < size;) {
    if (__atomic_load_n(&flags[r * kFlagStride], __ATOMIC_ACQUIRE) >= round) {
      ++r;
      continue;
    }
    // A partner still computing: spin briefly (it is usually microseconds away), then give the
    // core up between polls, as a rank sharing its core with the driver must.
    if (++spins % 256 == 0) {
      sched_yield();
      if (std::chrono::steady_clock::now() > deadline) return false;
    } else {
      cpu_relax();
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "shm_all_reduce", [&] {
    scalar_t* out = t.data_ptr<scalar_t>();
    std::memcpy(out, slots, t.nbytes());
    for (int64_t r = 1; r < size; ++r)
      add_into(out, reinterpret_cast<const scalar_t*>(slots + r * slot_bytes), t.numel());
  });
  return true;
}

}  // namespace
