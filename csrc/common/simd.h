// Compile-time facts about SIMD support. SIMD code is compiled per function with a target
// attribute (no -march flags), so one build runs on any x86-64 and the kernels pick a path at run
// time; on other architectures only the portable scalar kernels are built.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define METAL_MARLIN_X86 1
#define METAL_MARLIN_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 F/BW/VL (Skylake-SP and later, Zen 4): 16 float lanes, 32 registers, masks, vpermps on
// 16 entries. Nothing beyond these three extensions is used.
#define METAL_MARLIN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#else
#define METAL_MARLIN_X86 0
#endif

#if METAL_MARLIN_X86
// The intrinsics, for every SIMD file (include this header, not <immintrin.h>). GCC 12 warns about
// the vectors the AVX-512 intrinsics leave undefined on purpose (GCC bug 105593); the warning points
// into the header, so silencing it around the include keeps our own code's warnings on.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
