// Picks the kernel path: the best the CPU supports, unless set_simd_level chose another.
#include <atomic>
#include <stdexcept>
#include <vector>

#include "common/simd.h"
#include "cpu/gemv.h"
#include "cpu/group_gemv.h"
#include "cpu/kernels.h"

#if METAL_MARLIN_X86
#include <cpuid.h>
#endif

namespace metal_marlin::cpu {
namespace {

SimdLevel detect_simd_level() {
#if METAL_MARLIN_X86
  // F16C is read from CPUID directly: not every compiler's __builtin_cpu_supports knows it. The
  // avx512 checks include the OS saving the ZMM state (libgcc and compiler-rt test XCR0).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)) return SimdLevel::kScalar;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (!cpu_has_avx512_vnni()) return SimdLevel::kAvx512;
    return cpu_has_amx_int8() ? SimdLevel::kAvx512Amx : SimdLevel::kAvx512Vnni;
  }
  return SimdLevel::kAvx2;
#else
  return SimdLevel::kScalar;
#endif
}

std::atomic<SimdLevel>& level_in_effect() {
  static std::atomic<SimdLevel> level{best_simd_level()};
  return level;
}

}  // namespace

SimdLevel best_simd_level() {
  static const SimdLevel best = detect_simd_level();
  return best;
}

SimdLevel current_simd_level() { return level_in_effect().load(std::memory_order_relaxed); }

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512Amx: return "avx512_amx";
    case SimdLevel::kAvx512Vnni: return "avx512_vnni";
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kScalar: break;
  }
  return "scalar";
}

const char* simd_level() { return simd_level_name(current_simd_level()); }

std::string set_simd_level(const std::string& name) {
  SimdLevel level;
  if (name == "auto") {
    level = best_simd_level();
  } else if (name == "avx512_amx") {
    level = SimdLevel::kAvx512Amx;
  } else if (name == "avx512_vnni") {
    level = SimdLevel::kAvx512Vnni;
  } else if (name == "avx512") {
    level = SimdLevel::kAvx512;
  } else if (name == "avx2") {
    level = SimdLevel::kAvx2;
  } else if (name == "scalar") {
    level = SimdLevel::kScalar;
  } else {
    throw std::invalid_argument("set_simd_level: unknown level '" + name +
                                "'; expected 'auto', 'avx512_amx', 'avx512_vnni', 'avx512', 'avx2' or 'scalar'");
  }
  if (level > best_simd_level()) {
    throw std::invalid_argument("set_simd_level: this CPU cannot run '" + name + "' (best: '" +
                                simd_level_name(best_simd_level()) + "')");
  }
  return simd_level_name(level_in_effect().exchange(level));
}

namespace {

void run_quant_matmul(const MatmulArgs& args, bool integer_paths) {
  if (args.m == 0 || args.w.n == 0) return;
  if (args.w.k == 0) {  // an empty sum: out = bias
    const std::vector<float> zeros(size_t(args.w.n), 0.0f);
    for (int64_t row = 0; row < args.m; ++row) store_outputs(args, row, 0, args.w.n, zeros.data());
    return;
  }
  switch (current_simd_level()) {
#if METAL_MARLIN_X86
    case SimdLevel::kAvx512Amx:
    case SimdLevel::kAvx512Vnni:
      if (integer_paths && gemv_uses_vnni(current_simd_level(), args.w.format)) {
        if (args.m <= group_kernels::kGemvChunkedMaxRows) return quant_matmul_vnni_gemv(args);
        return quant_matmul_vnni_gemm(args, current_simd_level() == SimdLevel::kAvx512Amx);
      }
      return quant_matmul_avx512(args);
    case SimdLevel::kAvx512: return quant_matmul_avx512(args);
    case SimdLevel::kAvx2: return quant_matmul_avx2(args);
#endif
    default: return quant_matmul_scalar(args);
  }
}

}  // namespace

void quant_matmul(const MatmulArgs& args) { run_quant_matmul(args, true); }

void quant_matmul_float_activations(const MatmulArgs& args) { run_quant_matmul(args, false); }

void dequantize(const QuantizedMatrix& w, float* out) {
  switch (current_simd_level()) {
#if METAL_MARLIN_X86
    case SimdLevel::kAvx512Amx:
    case SimdLevel::kAvx512Vnni:
    case SimdLevel::kAvx512: return dequantize_avx512(w, out);
    case SimdLevel::kAvx2: return dequantize_avx2(w, out);
#endif
    default: return dequantize_scalar(w, out);
  }
}

}  // namespace metal_marlin::cpu
