// The dense CUDA passes for __half inputs, on the tensor cores (one file per
// input type, so that ninja compiles them in parallel).
#include "attnzoo/ops/cuda/dense_mma.cuh"

namespace attnzoo::cuda {
const DensePasses* dense_passes_f16(int64_t D, int64_t Dv) {
  return mma_passes_for<__half, DensePolicy>(D, Dv);
}
}  // namespace attnzoo::cuda
