// The activation rounding shared by the integer GEMV (gemv_vnni.cpp) and GEMM (gemm_vnni.cpp): per
// 32-block b, d_b = max|x_b| / kVnniRange and t = round(x / d_b) = 256 * high + low with high, low int8
// (gemv.h, docs/kernels.md). One definition, so every row count rounds the same way.
#pragma once

#include "common/simd.h"

#if METAL_MARLIN_X86

#include <cstdint>

#include "cpu/gemv.h"

#define METAL_MARLIN_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace metal_marlin::cpu {

// t for the 32 values at x (two vectors of 16 int32 lanes, codes 0-15 and 16-31); returns d.
METAL_MARLIN_AVX512_VNNI inline float quantize_block(const float* x, __m512i t[2]) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float max_abs = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  if (!(max_abs > 0.0f)) {  // all zero (NaN activations give NaN results on every path anyway)
    t[0] = t[1] = _mm512_setzero_si512();
    return 0.0f;
  }
  const __m512 inv = _mm512_set1_ps(float(kVnniRange) / max_abs);
  const __m512i hi = _mm512_set1_epi32(kVnniRange), lo = _mm512_set1_epi32(-kVnniRange);
  t[0] = _mm512_max_epi32(lo, _mm512_min_epi32(hi, _mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
  t[1] = _mm512_max_epi32(lo, _mm512_min_epi32(hi, _mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
  return max_abs / float(kVnniRange);
}

// 16 int32 lanes -> 16 (high, low) int8 bytes with t = 256 * high + low.
METAL_MARLIN_AVX512_VNNI inline void split_bytes(__m512i t, int8_t* high, int8_t* low) {
  const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(t, _mm512_set1_epi32(128)), 8);
  const __m512i l = _mm512_sub_epi32(t, _mm512_slli_epi32(h, 8));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(high), _mm512_cvtepi32_epi8(h));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(low), _mm512_cvtepi32_epi8(l));
}

// The float sum of x[begin, end) (a group; its length a multiple of 16): the offset terms' exact input.
METAL_MARLIN_AVX512_VNNI inline float group_sum(const float* x, int64_t begin, int64_t end) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = begin; j < end; j += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + j));
  return _mm512_reduce_add_ps(acc);
}

}  // namespace metal_marlin::cpu

#endif  // METAL_MARLIN_X86
