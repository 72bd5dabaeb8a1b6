// Compiled once per instruction set (see CMakeLists.txt): CPU_CAPABILITY and
// ATTNZOO_ENGINE_ISA name the build, and engine_<ISA>() hands out its entry
// points. Keep this file free of Tensor headers: only plain data crosses.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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
    {{&lsh_forward_range<float>, &lsh_backward_range<float>},
     {&lsh_forward_range<double>, &lsh_backward_range<double>}},
};

}  // namespace
}  // namespace CPU_CAPABILITY

#define ATTNZOO_ENGINE_FN2(isa) engine_##isa
#define ATTNZOO_ENGINE_FN(isa) ATTNZOO_ENGINE_FN2(isa)
const EngineTable& ATTNZOO_ENGINE_FN(ATTNZOO_ENGINE_ISA)() { return kTable; }

}  // namespace attnzoo::cpu
