// The dense CUDA passes for __half inputs (one file per input type, so that
// ninja compiles them in parallel).
#include "attnzoo/ops/cuda/dense_kernels.cuh"

namespace attnzoo::cuda {
const DensePasses* dense_passes_f16(int64_t D, int64_t Dv) { return dense_passes_for<__half>(D, Dv); }
}  // namespace attnzoo::cuda
