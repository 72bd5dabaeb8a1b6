#pragma once
// Dropout regenerated from a seed, never stored.
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <cstdint>

#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// Dropout with a counter-based generator: the keep decision for (b, h, i, j)
// is a pure function of (seed, index), so backward regenerates the pattern
// instead of storing it. SplitMix64: output n is mix(seed + n * gamma).
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;  // drop iff 24-bit uniform < threshold
  double keep_scale = 1.0;
  int64_t H = 0, Nq = 0, Nk = 0;

  Dropout(double p, uint64_t seed_)
      : active(p > 0),
        seed(seed_),
        threshold(static_cast<uint64_t>(p * double(1u << 24))),
        keep_scale(p < 1 ? 1.0 / (1.0 - p) : 0.0) {}
  explicit Dropout(const DenseArgs& a) : Dropout(a.dropout_p, a.seed) { H = a.H, Nq = a.Nq, Nk = a.Nk; }
  // Whether the element with this counter is kept: a 24-bit uniform >= p.
  bool keeps(uint64_t index) const {
    return (splitmix64(seed + (index + 1) * 0x9e3779b97f4a7c15ULL) >> 40) >= threshold;
  }
  // row[c] *= keep(b, h, i, j0 + c) / (1 - p)
  template <typename T>
  void apply(T* row, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const uint64_t base = ((uint64_t(b) * H + h) * Nq + i) * Nk + j0;
    const T s = T(keep_scale);
    for (int64_t c = 0; c < n; ++c) row[c] = keeps(base + c) ? row[c] * s : T(0);
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
