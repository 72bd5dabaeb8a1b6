#pragma once
// What the dense policy computes per element, written once for both engines:
// the CPU engine (cpu/engine/) and the CUDA kernels (cuda/) include this file,
// so the CPU test suite exercises the same rules the GPU runs. Plain C++ with
// no Torch or CUDA headers; under nvcc every function is __host__ __device__.
//
//   the band      key j is visible from query position p iff
//                 p - left <= j <= p + right (causal: right = 0); query row i
//                 stands at position p = i + Nk - Nq (bottom-right alignment)
//   ALiBi         adds -slope * |p - j|
//   dropout       counter-based: the keep decision for element (b, h, i, j) is
//                 a pure function of (seed, index), so the backward regenerates
//                 the pattern, and the CPU and the GPU drop the same elements
//                 for the same seed
//
// T5's bucket function is not here: it uses a float32 logarithm, and it must
// agree bit for bit with HF transformers' ATen formula, which a device
// logarithm need not (1 ulp moves a boundary). Both engines take the buckets
// of the Nq + Nk - 1 relative positions from t5_relative_bucket once per call
// and look them up per element.
#include <cstdint>

#if defined(__CUDACC__)
#define ATTNZOO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ATTNZOO_HOST_DEVICE inline
#endif

namespace attnzoo::rules {

// --- The band -------------------------------------------------------------

// First visible key of the query at position p (may be < 0: clamp to the tile).
ATTNZOO_HOST_DEVICE int64_t band_begin(int64_t p, int64_t left) { return p - left; }
// One past the last visible key of the query at position p (may be > Nk).
ATTNZOO_HOST_DEVICE int64_t band_end(int64_t p, int64_t right) { return p + right + 1; }
ATTNZOO_HOST_DEVICE bool in_band(int64_t p, int64_t j, int64_t left, int64_t right) {
  return j >= band_begin(p, left) && j < band_end(p, right);
}

ATTNZOO_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
ATTNZOO_HOST_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The keys [lo, hi) that query rows [q0, q0 + mq) can see through the band
// (offset = Nk - Nq); lo == hi when none.
struct Range {
  int64_t lo, hi;
};
ATTNZOO_HOST_DEVICE Range band_keys(int64_t q0, int64_t mq, int64_t offset, int64_t left, int64_t right,
                                    int64_t Nk) {
  const int64_t lo = max64(0, band_begin(q0 + offset, left));
  const int64_t hi = min64(Nk, band_end(q0 + mq - 1 + offset, right));
  return {lo, max64(lo, hi)};
}
// The query rows [lo, hi) that can see keys [k0, k0 + nk) through the band.
ATTNZOO_HOST_DEVICE Range band_queries(int64_t k0, int64_t nk, int64_t offset, int64_t left, int64_t right,
                                       int64_t Nq) {
  const int64_t lo = max64(0, k0 - right - offset);
  const int64_t hi = min64(Nq, k0 + nk - 1 + left - offset + 1);
  return {lo, max64(lo, hi)};
}

// --- Broadcast operands -------------------------------------------------

// A mask or bias broadcast to (B, H, Nq, Nk): element (b, h, i, j) lives at
// data[offset(b, h, i, j)]; a broadcast dimension has stride 0.
struct Broadcast4 {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  ATTNZOO_HOST_DEVICE bool present() const { return data != nullptr; }
  ATTNZOO_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * sb + h * sh + i * si + j * sj;
  }
};

// --- ALiBi ----------------------------------------------------------------

template <typename T>
ATTNZOO_HOST_DEVICE T alibi_term(T slope, int64_t p, int64_t j) {
  const int64_t d = p > j ? p - j : j - p;
  return -slope * T(d);
}

// --- Dropout --------------------------------------------------------------

// SplitMix64's output mixer: output n of the stream is mix(seed + n * gamma).
ATTNZOO_HOST_DEVICE uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// An element is dropped iff a 24-bit uniform < threshold = p * 2^24.
ATTNZOO_HOST_DEVICE uint64_t dropout_threshold(double p) {
  return static_cast<uint64_t>(p * double(1u << 24));
}
// What a kept element is multiplied by: 1 / (1 - p), and 0 when p = 1.
ATTNZOO_HOST_DEVICE double dropout_keep_scale(double p) { return p < 1 ? 1.0 / (1.0 - p) : 0.0; }
ATTNZOO_HOST_DEVICE bool dropout_keeps(uint64_t seed, uint64_t threshold, uint64_t index) {
  return (splitmix64(seed + (index + 1) * 0x9e3779b97f4a7c15ULL) >> 40) >= threshold;
}
// The counter of element (b, h, i, j) of a (B, H, Nq, Nk) score matrix.
ATTNZOO_HOST_DEVICE uint64_t dropout_index(int64_t b, int64_t h, int64_t i, int64_t j, int64_t H, int64_t Nq,
                                           int64_t Nk) {
  return ((uint64_t(b) * uint64_t(H) + uint64_t(h)) * uint64_t(Nq) + uint64_t(i)) * uint64_t(Nk) +
         uint64_t(j);
}

}  // namespace attnzoo::rules
