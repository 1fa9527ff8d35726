// Picks the kernel path once per process from what the CPU supports.
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"

#if METAL_MARLIN_X86
#include <cpuid.h>
#endif

namespace metal_marlin::cpu {
namespace {

bool cpu_supports_avx2_fma_f16c() {
#if METAL_MARLIN_X86
  // F16C is read from CPUID directly: not every compiler's __builtin_cpu_supports knows it.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#else
  return false;
#endif
}

// METAL_MARLIN_CPU_SIMD=scalar forces the portable kernels (to test them on an AVX2 machine).
bool use_avx2() {
  static const bool avx2 = [] {
    const char* forced = std::getenv("METAL_MARLIN_CPU_SIMD");
    if (forced && std::strcmp(forced, "scalar") == 0) return false;
    return cpu_supports_avx2_fma_f16c();
  }();
  return avx2;
}

}  // namespace

const char* simd_level() { return use_avx2() ? "avx2" : "scalar"; }

void quant_matmul(const MatmulArgs& args) {
  if (args.m == 0 || args.w.n == 0) return;
  if (args.w.k == 0) {  // an empty sum: out = bias
    const std::vector<float> zeros(size_t(args.w.n), 0.0f);
    for (int64_t row = 0; row < args.m; ++row) store_outputs(args, row, 0, args.w.n, zeros.data());
    return;
  }
#if METAL_MARLIN_X86
  if (use_avx2()) return quant_matmul_avx2(args);
#endif
  quant_matmul_scalar(args);
}

void dequantize(const QuantizedMatrix& w, float* out) {
#if METAL_MARLIN_X86
  if (use_avx2()) return dequantize_avx2(w, out);
#endif
  dequantize_scalar(w, out);
}

}  // namespace metal_marlin::cpu
