// The dense CUDA passes for __nv_bfloat16 inputs, on the tensor cores (one file per
// input type, so that ninja compiles them in parallel).
#include "attnzoo/ops/cuda/dense_mma.cuh"

namespace attnzoo::cuda {
const DensePasses* dense_passes_bf16(int64_t D, int64_t Dv) {
  return mma_passes_for<__nv_bfloat16, DensePolicy>(D, Dv);
}
}  // namespace attnzoo::cuda
