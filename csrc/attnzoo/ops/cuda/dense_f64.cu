// The dense CUDA passes for double inputs (one file per input type, so that
// ninja compiles them in parallel).
#include "attnzoo/ops/cuda/dense_kernels.cuh"

namespace attnzoo::cuda {
const DensePasses* dense_passes_f64(int64_t D, int64_t Dv) {
  return dense_passes_for<double, DensePolicy>(D, Dv);
}
}  // namespace attnzoo::cuda
