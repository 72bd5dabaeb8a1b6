#pragma once
// The tile products go to the BLAS inside the torch wheel (MKL on x86-64),
// through its Fortran interface, which libtorch_cpu exports. ATen's own
// cpublas::gemm wrapper is not exported from the wheel.
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
// MKL only (weak: absent from other BLAS builds). Returns the previous value.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace attnzoo::cpu {

// The engine calls BLAS from inside its own parallel loop, one small tile at
// a time: each call must run on the calling thread. Otherwise MKL starts its
// OpenMP driver for every tile and the threads spend their time in barriers.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// Column-major C(m x n) = alpha * op(A) op(B) + beta * C. Tile sizes are far
// below INT_MAX; leading dimensions are clamped to >= 1 as BLAS requires.
template <typename T>
inline void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                      int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k);
  const int la = int(lda > 0 ? lda : 1), lb = int(ldb > 0 ? ldb : 1), lc = int(ldc > 0 ? ldc : 1);
  if constexpr (sizeof(T) == 4) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
  }
}

// Row-major tiles through the column-major BLAS interface:
// C(m x n, row-major, ldc) = A(m x k) * B(k x n) is C^T = B^T A^T.
template <typename T>
inline void gemm_rowmajor(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  blas_gemm(trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

}  // namespace attnzoo::cpu
