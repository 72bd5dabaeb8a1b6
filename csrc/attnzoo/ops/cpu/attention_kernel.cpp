// Compiled once per instruction set (see CMakeLists.txt): CPU_CAPABILITY and
// ATTNZOO_ENGINE_ISA name the build, and engine_<ISA>() hands out its entry
// points. Keep this file free of Tensor headers: only plain data crosses.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "attnzoo/ops/cpu/engine.h"
#include "attnzoo/ops/cpu/lsh_kernel.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// A policy object per call of a range: policies may keep per-thread scratch.
template <typename T, template <typename> class Policy, class Tiles = ComputeTiles<T>>
void forward(const DenseArgs& a, int64_t begin, int64_t end) {
  Policy<T> policy(a);
  forward_range<T, Policy<T>, Tiles>(a, policy, begin, end);
}
template <typename T, template <typename> class Policy>
void probs(const DenseArgs& a, int64_t begin, int64_t end) {
  Policy<T> policy(a);
  probs_range<T>(a, policy, begin, end);
}
template <typename T, template <typename> class Policy, class Tiles = ComputeTiles<T>>
void backward(const DenseArgs& a, int64_t begin, int64_t end) {
  Policy<T> policy(a);
  backward_range<T, Policy<T>, Tiles>(a, policy, begin, end);
}
template <typename T, template <typename> class Policy>
constexpr PassTable passes() {
  return {&forward<T, Policy>, &probs<T, Policy>, &backward<T, Policy>};
}

// bfloat16 inputs, float compute (tiles.h). Only the AVX-512 build has them:
// the CPUs with bfloat16 products (AVX512-BF16, AMX) all run it. There is no
// probabilities pass: attention_weights computes in float.
// [0]: dk and dv written in bfloat16; [1]: in float (GQA: the caller sums groups).
template <template <typename> class Policy, typename GradKV>
constexpr PassTable bf16_passes() {
#if defined(CPU_CAPABILITY_AVX512)
  return {&forward<float, Policy, Bf16Tiles<GradKV>>, nullptr, &backward<float, Policy, Bf16Tiles<GradKV>>};
#else
  return {nullptr, nullptr, nullptr};
#endif
}

// Causal linear attention's feature maps (engine_api.h): elu(x) + 1 is
// x + 1 above 0 and e^x below, its slope 1 and e^x; relu and its step.
template <typename T>
void feature_rows(int64_t map, bool slope, const void* x_, void* y_, int64_t n) {
  using V = Vec<T>;
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  const V zero(T(0)), one(T(1));
  auto apply = [&](const V& v) {
    const V positive = v > zero;  // all-ones lanes where v > 0
    if (map == 1) return V::blendv(v.exp(), slope ? one : v + one, positive);
    return V::blendv(zero, slope ? one : v, positive);
  };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) apply(V::loadu(x + i)).store(y + i);
  if (i < n) apply(V::loadu(x + i, n - i)).store(y + i, n - i);
}

// The models' dropout rows (engine_api.h), in T's op-math type (float for
// the 16-bit types). The loop is written plainly for the compiler to
// vectorise under this build's instruction set.
template <typename T>
void dropout_rows(const void* x_, void* y_, int64_t n, uint64_t first, uint64_t seed, uint64_t threshold,
                  double scale) {
  using Op = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  const Op s = Op(scale);
  for (int64_t i = 0; i < n; ++i)
    y[i] = rules::dropout_keeps(seed, threshold, first + uint64_t(i)) ? T(Op(x[i]) * s) : T(0);
}

// GELU with the tanh approximation and its derivative (engine_api.h), in
// T's op-math type. 0.5 x (1 + tanh(u)) = x sigmoid(2u) with
// u = sqrt(2/pi) (x + 0.044715 x^3): one exp and one division per element,
// where ATen computes a vectorised tanh (3x its exact GELU's time here).
// The derivative is s + 2 x s (1 - s) u' with s = sigmoid(2u).
template <typename Op>
void gelu_tanh_op(bool backward, const Op* x, const Op* dy, Op* out, int64_t n) {
  using V = Vec<Op>;
  const V beta(Op(0.7978845608028654)), kappa(Op(0.044715)), one(Op(1)), two(Op(2)), three(Op(3)),
      minus_two(Op(-2));
  auto apply = [&](const V& v, const V& g) {
    const V v2 = v * v;
    const V u = beta * (v + kappa * v2 * v);
    const V s = one / (one + (minus_two * u).exp());
    if (!backward) return v * s;
    return g * (s + two * v * s * (one - s) * beta * (one + three * kappa * v2));
  };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size())
    apply(V::loadu(x + i), backward ? V::loadu(dy + i) : one).store(out + i);
  if (i < n) {
    const int64_t rest = n - i;
    apply(V::loadu(x + i, rest), backward ? V::loadu(dy + i, rest) : one).store(out + i, rest);
  }
}

template <typename T>
void gelu_tanh_rows(bool backward, const void* x_, const void* dy_, void* out_, int64_t n) {
  using Op = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* x = static_cast<const T*>(x_);
  const T* dy = static_cast<const T*>(dy_);
  T* out = static_cast<T*>(out_);
  if constexpr (std::is_same_v<T, Op>) {
    gelu_tanh_op<Op>(backward, x, dy, out, n);
  } else {  // 16-bit types: through float, a chunk at a time
    constexpr int64_t kChunk = 256;
    Op xs[kChunk], gs[kChunk];
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t m = std::min(kChunk, n - start);
      for (int64_t j = 0; j < m; ++j) xs[j] = Op(x[start + j]);
      if (backward)
        for (int64_t j = 0; j < m; ++j) gs[j] = Op(dy[start + j]);
      gelu_tanh_op<Op>(backward, xs, gs, xs, m);
      for (int64_t j = 0; j < m; ++j) out[start + j] = T(xs[j]);
    }
  }
}

#define ATTNZOO_STR2(x) #x
#define ATTNZOO_STR(x) ATTNZOO_STR2(x)

const EngineTable kTable = {
    ATTNZOO_STR(ATTNZOO_ENGINE_ISA),
    {passes<float, DensePolicy>(), passes<double, DensePolicy>()},
    {passes<float, BlockSparsePolicy>(), passes<double, BlockSparsePolicy>()},
    {passes<float, ShawPolicy>(), passes<double, ShawPolicy>()},
    {bf16_passes<DensePolicy, c10::BFloat16>(), bf16_passes<DensePolicy, float>()},
    {bf16_passes<BlockSparsePolicy, c10::BFloat16>(), bf16_passes<BlockSparsePolicy, float>()},
    {&feature_rows<float>, &feature_rows<double>},
    {&dropout_rows<float>, &dropout_rows<double>, &dropout_rows<c10::BFloat16>, &dropout_rows<c10::Half>},
    {&gelu_tanh_rows<float>, &gelu_tanh_rows<double>, &gelu_tanh_rows<c10::BFloat16>,
     &gelu_tanh_rows<c10::Half>},
    {{&lsh_forward_range<float>, &lsh_backward_range<float>},
     {&lsh_forward_range<double>, &lsh_backward_range<double>}},
};

}  // namespace
}  // namespace CPU_CAPABILITY

#define ATTNZOO_ENGINE_FN2(isa) engine_##isa
#define ATTNZOO_ENGINE_FN(isa) ATTNZOO_ENGINE_FN2(isa)
const EngineTable& ATTNZOO_ENGINE_FN(ATTNZOO_ENGINE_ISA)() { return kTable; }

}  // namespace attnzoo::cpu
