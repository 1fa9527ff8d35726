// Blockwise normalised Sylvester Hadamard transform of the last dimension: every consecutive block
// of `block` elements is multiplied by H_block / sqrt(block), H[i, j] = (-1)^popcount(i & j).
// Fast Walsh-Hadamard transform (block * log2(block) adds per block): with AVX2 the three stages
// with stride < 8 run inside one vector (permute + fma by +-1, exact like an add/sub), the wider
// stages add/subtract whole vectors; the 1/sqrt(block) scale is folded into the last stage.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/thread_pool.h"
#include "cpu/trellis_kernels.h"

#if METAL_MARLIN_X86
#include <immintrin.h>
#endif

namespace metal_marlin::cpu::trellis_cpu {
namespace {

void fwht_scalar(float* v, int64_t b, float scale) {
  for (int64_t h = 1; h < b; h <<= 1) {
    for (int64_t i = 0; i < b; i += 2 * h) {
      for (int64_t k = i; k < i + h; ++k) {
        const float p = v[k], q = v[k + h];
        v[k] = p + q;
        v[k + h] = p - q;
      }
    }
  }
  for (int64_t k = 0; k < b; ++k) v[k] *= scale;
}

#if METAL_MARLIN_X86
// b >= 8.
METAL_MARLIN_AVX2 void fwht_avx2(float* v, int64_t b, float scale) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  const __m256 vscale = _mm256_set1_ps(scale);
  const bool last_in_register = b == 8;
  for (int64_t k = 0; k < b; k += 8) {
    __m256 x = _mm256_loadu_ps(v + k);
    x = _mm256_fmadd_ps(x, s1, _mm256_permute_ps(x, 0xB1));
    x = _mm256_fmadd_ps(x, s2, _mm256_permute_ps(x, 0x4E));
    x = _mm256_fmadd_ps(x, s4, _mm256_permute2f128_ps(x, x, 1));
    if (last_in_register) x = _mm256_mul_ps(x, vscale);
    _mm256_storeu_ps(v + k, x);
  }
  for (int64_t h = 8; h < b; h <<= 1) {
    const bool last = 2 * h == b;
    for (int64_t i = 0; i < b; i += 2 * h) {
      for (int64_t k = i; k < i + h; k += 8) {
        const __m256 p = _mm256_loadu_ps(v + k), q = _mm256_loadu_ps(v + k + h);
        __m256 sum = _mm256_add_ps(p, q), diff = _mm256_sub_ps(p, q);
        if (last) {
          sum = _mm256_mul_ps(sum, vscale);
          diff = _mm256_mul_ps(diff, vscale);
        }
        _mm256_storeu_ps(v + k, sum);
        _mm256_storeu_ps(v + k + h, diff);
      }
    }
  }
}
#endif

}  // namespace

void hadamard(const float* x, float* out, int64_t m, int64_t n, int64_t block, int n_threads) {
  if (m == 0 || n == 0) return;
  const float scale = float(1.0 / std::sqrt(double(block)));
  bool vector = false;
#if METAL_MARLIN_X86
  vector = block >= 8 && simd() != Simd::kScalar;
#endif
  (void)vector;
  // About 64 Ki elements per task.
  const int64_t rows_per_task = std::max<int64_t>(1, (int64_t(1) << 16) / n);
  const int64_t n_tasks = (m + rows_per_task - 1) / rows_per_task;
  const int threads = plan_threads(n_threads, n_tasks);
  parallel_for(threads, n_tasks, [&](int64_t task, int) {
    const int64_t r0 = task * rows_per_task, r1 = std::min(m, r0 + rows_per_task);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = out + r * n;
      if (row != x + r * n) std::memmove(row, x + r * n, size_t(n) * sizeof(float));
      for (int64_t b0 = 0; b0 < n; b0 += block) {
#if METAL_MARLIN_X86
        if (vector) {
          fwht_avx2(row + b0, block, scale);
          continue;
        }
#endif
        fwht_scalar(row + b0, block, scale);
      }
    }
  });
}

}  // namespace metal_marlin::cpu::trellis_cpu
