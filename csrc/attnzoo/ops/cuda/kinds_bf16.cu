// The CUDA passes for __nv_bfloat16 inputs with the kinds compiled in (block-sparse
// layouts, Shaw, LSH: KindsPolicy), apart from the dense ones (dense_bf16.cu)
// so that ninja compiles them in parallel and dense attention keeps its registers.
#include "attnzoo/ops/cuda/dense_mma.cuh"

namespace attnzoo::cuda {
const DensePasses* kind_passes_bf16(int64_t D, int64_t Dv) {
  return mma_passes_for<__nv_bfloat16, KindsPolicy>(D, Dv);
}
}  // namespace attnzoo::cuda
