// CPU kernels of the trellis format: Viterbi quantizer, decode, fused matmul, block Hadamard.
#pragma once

#include <cstdint>

#include "common/simd.h"
#include "common/trellis.h"

#if METAL_MARLIN_X86
// Sapphire Rapids class: AVX-512 with FP16 arithmetic, VBMI (byte permutes) and VBMI2 (funnel shifts).
#define METAL_MARLIN_AVX512_TRELLIS \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512fp16,avx2,fma,f16c")))
#endif

namespace metal_marlin::cpu::trellis_cpu {

using metal_marlin::trellis::Codebook;

enum class Simd { kScalar, kAvx2, kAvx512 };

// The best path this machine supports, capped by the level set with cpu::set_simd_level.
Simd simd();
const char* simd_name();

// All 65536 codebook values (float32), computed once per process and codebook.
const float* codebook_table(Codebook cb);

// targets [n_tiles, 256] -> packed [n_tiles, 8*bits] (uint32 words) and values [n_tiles, 256].
void quantize(const float* targets, int64_t n_tiles, int bits, Codebook cb, uint32_t* packed, float* values,
              int n_threads);

// packed [n_tiles, 8*bits] -> out [n_tiles, 256].
void decode(const uint32_t* packed, int64_t n_tiles, int bits, Codebook cb, float* out);

struct MatmulArgs {
  const float* x;          // [m, k]
  const uint32_t* packed;  // [n/16, k/16, 8*bits]
  float* out;              // [m, n]
  int64_t m, n, k;
  int bits;
  Codebook cb;
  int n_threads;
};
void matmul(const MatmulArgs& args);

// The matmul paths (M <= kGemvMaxRows: GEMV, one pass over the tiles per row block; above: GEMM).
constexpr int64_t kGemvMaxRows = 8;
void matmul_scalar(const MatmulArgs& args);
#if METAL_MARLIN_X86
void matmul_avx2(const MatmulArgs& args);
void matmul_avx512(const MatmulArgs& args);
#endif

// Where the SIMD decoders find the state of step t: its 16-bit window starts at stream bit
// window_start(bits, t) (in [0, 256*bits)) ...
inline int window_start(int bits, int t) {
  const int start = (t + 1) * bits - trellis::kStateBits;
  return start < 0 ? start + trellis::kTileSteps * bits : start;
}
// ... and stream byte y (MSB first) is byte memory_byte(y) of the tile's little-endian words.
inline int memory_byte(int y) { return (y & ~3) | (3 - (y & 3)); }

// out[r, :] = blockwise H_block / sqrt(block) of x[r, :]; x [m, n]; out may alias x.
void hadamard(const float* x, float* out, int64_t m, int64_t n, int64_t block, int n_threads);

}  // namespace metal_marlin::cpu::trellis_cpu
