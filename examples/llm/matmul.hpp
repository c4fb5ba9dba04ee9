// Matrix products for the engine: OpenBLAS's sgemm when CMake found a BLAS
// (LLM_HAVE_CBLAS), otherwise a portable blocked kernel.
#pragma once

#include <algorithm>
#include <cstddef>

#if defined(LLM_HAVE_CBLAS)
#include <cblas.h>
#endif

namespace llm {

// C (m x n, ldc) = alpha * A (m x k, lda) * op(B) + beta * C, row-major.
// op(B) = B^T with B (n x k, ldb) when b_trans, else B (k x n, ldb).
inline void gemm(bool b_trans, std::size_t m, std::size_t n, std::size_t k, float alpha,
                 const float* A, std::size_t lda, const float* B, std::size_t ldb, float beta,
                 float* C, std::size_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(LLM_HAVE_CBLAS)
  cblas_sgemm(CblasRowMajor, CblasNoTrans, b_trans ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, A, static_cast<int>(lda), B,
              static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
#else
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j)
      C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
  constexpr std::size_t bm = 4, bn = 64, bk = 256;
  for (std::size_t k0 = 0; k0 < k; k0 += bk) {
    const std::size_t k1 = std::min(k, k0 + bk);
    for (std::size_t j0 = 0; j0 < n; j0 += bn) {
      const std::size_t j1 = std::min(n, j0 + bn);
      for (std::size_t i0 = 0; i0 < m; i0 += bm) {
        const std::size_t i1 = std::min(m, i0 + bm);
        if (b_trans) {
          for (std::size_t i = i0; i < i1; ++i)
            for (std::size_t j = j0; j < j1; ++j) {
              const float* a = A + i * lda;
              const float* b = B + j * ldb;
              float s = 0.0f;
              for (std::size_t p = k0; p < k1; ++p) s += a[p] * b[p];
              C[i * ldc + j] += alpha * s;
            }
        } else {
          for (std::size_t i = i0; i < i1; ++i)
            for (std::size_t p = k0; p < k1; ++p) {
              const float a = alpha * A[i * lda + p];
              const float* b = B + p * ldb;
              float* c = C + i * ldc;
              for (std::size_t j = j0; j < j1; ++j) c[j] += a * b[j];
            }
        }
      }
    }
  }
#endif
}

// Y (m x out) = X (m x in) * W^T, W (out x in) row-major: a linear layer.
inline void linear(const float* X, std::size_t m, std::size_t in, const float* W, std::size_t out,
                   float* Y) {
  gemm(true, m, out, in, 1.0f, X, in, W, in, 0.0f, Y, out);
}

}  // namespace llm
