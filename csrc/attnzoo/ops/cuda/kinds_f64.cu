// The CUDA passes for double inputs with the kinds compiled in (block-sparse
// layouts, Shaw, LSH: KindsPolicy), apart from the dense ones (dense_f64.cu)
// so that ninja compiles them in parallel and dense attention keeps its registers.
#include "attnzoo/ops/cuda/dense_kernels.cuh"

namespace attnzoo::cuda {
const DensePasses* kind_passes_f64(int64_t D, int64_t Dv) {
  return dense_passes_for<double, KindsPolicy>(D, Dv);
}
}  // namespace attnzoo::cuda
