// Fused trellis matmul: out[M, N] = x[M, K] @ Q^T with Q decoded from the tile bit streams on the fly
// (Q is never materialised). This file: the choice of path and the portable scalar path; the SIMD
// paths are in trellis_matmul_avx512.cpp and trellis_matmul_avx2.cpp.
#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "cpu/trellis_kernels.h"

#if METAL_MARLIN_X86
#include <cpuid.h>
#endif

namespace metal_marlin::cpu::trellis_cpu {

using metal_marlin::trellis::kTileSteps;
using metal_marlin::trellis::words_per_tile;

// ---------------------------------------------------------------------------------------------
// Dispatch

namespace {

#if METAL_MARLIN_X86
bool os_saves_zmm() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return false;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state
}

bool cpu_has_avx512_trellis() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool f = ebx & (1u << 16), dq = ebx & (1u << 17), bw = ebx & (1u << 30), vl = ebx & (1u << 31);
  const bool vbmi = ecx & (1u << 1), vbmi2 = ecx & (1u << 6), fp16 = edx & (1u << 23);
  return f && dq && bw && vl && vbmi && vbmi2 && fp16 && os_saves_zmm();
}

bool cpu_has_avx2() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
}
#endif

// The best trellis path this CPU supports (the AVX-512 one needs more than the quant_matmul one).
Simd detect() {
#if METAL_MARLIN_X86
  if (cpu_has_avx512_trellis()) return Simd::kAvx512;
  if (cpu_has_avx2()) return Simd::kAvx2;
#endif
  return Simd::kScalar;
}

}  // namespace

// Capped by the process-wide level (cpu::set_simd_level), so tests and benchmarks switch the trellis
// kernels with the others.
Simd simd() {
  static const Simd best = detect();
  Simd cap = Simd::kScalar;
  switch (current_simd_level()) {
    case SimdLevel::kAvx512Amx:
    case SimdLevel::kAvx512Vnni:
    case SimdLevel::kAvx512: cap = Simd::kAvx512; break;
    case SimdLevel::kAvx2: cap = Simd::kAvx2; break;
    case SimdLevel::kScalar: break;
  }
  return std::min(best, cap);
}

const char* simd_name() {
  switch (simd()) {
    case Simd::kAvx512: return "avx512";
    case Simd::kAvx2: return "avx2";
    case Simd::kScalar: break;
  }
  return "scalar";
}

// ---------------------------------------------------------------------------------------------
// Scalar path: decode a whole tile through the value table, then multiply.

void matmul_scalar(const MatmulArgs& a) {
  const float* table = codebook_table(a.cb);
  const int64_t kt = a.k / 16;
  const int words = words_per_tile(a.bits);
  const int threads = plan_threads(a.n_threads, a.n / 16);
  parallel_for(threads, a.n / 16, [&](int64_t i, int) {
    std::vector<float> acc(size_t(a.m) * 16, 0.0f);
    float tile[kTileSteps];
    for (int64_t j = 0; j < kt; ++j) {
      const uint32_t* w = a.packed + (i * kt + j) * words;
      for (int t = 0; t < kTileSteps; ++t) tile[t] = table[trellis::tile_state(w, a.bits, t)];
      for (int64_t m = 0; m < a.m; ++m) {
        const float* xr = a.x + m * a.k + 16 * j;
        for (int r = 0; r < 16; ++r) {
          float s = 0.0f;
          for (int c = 0; c < 16; ++c) s += tile[16 * r + c] * xr[c];
          acc[size_t(m * 16 + r)] += s;
        }
      }
    }
    for (int64_t m = 0; m < a.m; ++m) {
      for (int r = 0; r < 16; ++r) a.out[m * a.n + 16 * i + r] = acc[size_t(m * 16 + r)];
    }
  });
}

void matmul(const MatmulArgs& a) {
  if (a.m == 0 || a.n == 0) return;
  if (a.k == 0) {
    std::fill(a.out, a.out + a.m * a.n, 0.0f);
    return;
  }
  switch (simd()) {
#if METAL_MARLIN_X86
    case Simd::kAvx512: return matmul_avx512(a);
    case Simd::kAvx2: return matmul_avx2(a);
#endif
    default: return matmul_scalar(a);
  }
}

}  // namespace metal_marlin::cpu::trellis_cpu
