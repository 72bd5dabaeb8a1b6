// The CUDA passes for float inputs with the kinds compiled in (block-sparse
// layouts, Shaw, LSH: KindsPolicy), apart from the dense ones (dense_f32.cu)
// so that ninja compiles them in parallel and dense attention keeps its registers.
#include "attnzoo/ops/cuda/dense_kernels.cuh"

namespace attnzoo::cuda {
const DensePasses* kind_passes_f32(int64_t D, int64_t Dv) {
  return dense_passes_for<float, KindsPolicy>(D, Dv);
}
}  // namespace attnzoo::cuda
