#pragma once
// The engine's arithmetic on rows and tiles: row-major BLAS products and the
// vectorised softmax row kernels.
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attnzoo/ops/cpu/blas.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------------------
// Vectorised row kernels. The exponentials are the hidden cost of attention on
// a CPU (N^2 per head), so they are fused with the max / sum passes and use a
// fast exp for float; double keeps the accurate one (it serves gradcheck).
template <typename T>
inline Vec<T> fast_exp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// Four independent accumulators: a single one would make every step wait for
// the previous max/add (latency-bound); four keep the vector units busy.
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  T m = neg_inf<T>();
  if (n >= 4 * W) {
    V m0 = V::loadu(x), m1 = V::loadu(x + W), m2 = V::loadu(x + 2 * W), m3 = V::loadu(x + 3 * W);
    for (c = 4 * W; c + 4 * W <= n; c += 4 * W) {
      m0 = at::vec::maximum(m0, V::loadu(x + c));
      m1 = at::vec::maximum(m1, V::loadu(x + c + W));
      m2 = at::vec::maximum(m2, V::loadu(x + c + 2 * W));
      m3 = at::vec::maximum(m3, V::loadu(x + c + 3 * W));
    }
    V vm = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
    m = at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x <- exp(x - m); returns the sum of the new x.
template <typename T>
inline T exp_sub_sum(T* x, int64_t n, T m) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V vm(m);
  V acc0(T(0)), acc1(T(0));
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    V e0 = fast_exp<T>(V::loadu(x + c) - vm);
    V e1 = fast_exp<T>(V::loadu(x + c + W) - vm);
    e0.store(x + c);
    e1.store(x + c + W);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  V acc = acc0 + acc1;
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    sum += x[c];
  }
  return sum;
}

// x <- exp(x - m) (m finite).
template <typename T>
inline void exp_sub(T* x, int64_t n, T m) {
  using V = Vec<T>;
  const V vm(m);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) fast_exp<T>(V::loadu(x + c) - vm).store(x + c);
  for (; c < n; ++c) x[c] = std::exp(x[c] - m);
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  using V = Vec<T>;
  const V va(a);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

// ds <- p * (dp - delta)
template <typename T>
inline void softmax_grad_row(const T* p, T* dp, int64_t n, T delta) {
  using V = Vec<T>;
  const V vd(delta);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(p + c) * (V::loadu(dp + c) - vd)).store(dp + c);
  for (; c < n; ++c) dp[c] = p[c] * (dp[c] - delta);
}

// dst[c] += src[c * stride]
template <typename T>
inline void add_strided(T* dst, const T* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    using V = Vec<T>;
    int64_t c = 0;
    for (; c + V::size() <= n; c += V::size()) (V::loadu(dst + c) + V::loadu(src + c)).store(dst + c);
    for (; c < n; ++c) dst[c] += src[c];
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] += src[c * stride];
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
