// Compile-time facts about SIMD support. SIMD code is compiled per function with a target
// attribute (no -march flags), so one build runs on any x86-64 and the kernels pick a path at run
// time; on other architectures only the portable scalar kernels are built.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define METAL_MARLIN_X86 1
#define METAL_MARLIN_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define METAL_MARLIN_X86 0
#endif
