// AVX2 + FMA + F16C kernels (compiled with target attributes, chosen at run time).
//
// GEMV path (m <= 8, token generation; m <= 16 as two passes): bound by reading the packed weights,
// so each thread takes whole rows of W and streams them once: per block, decode 32 codes into
// registers and FMA them against all m activation rows. Activations are permuted once per call into
// the decoder's lane order, and scales are applied once per group (sum_k w_k x_k =
// s * sum_k u_k x_k + o * sum_k x_k, with the group sums of x precomputed), so the inner loop is
// decode + FMA only.
//
// GEMM path (m > 16, prefill): a BLIS-style loop. For each block of kRowBlock activation rows and each
// kDepth-long slice of K, threads take 16-row tiles of W, decode the tile slice into a float32
// panel (16 KiB, stays in L1) and run a 6x16 register-blocked FMA micro-kernel over the activation
// rows, accumulating into a float32 buffer. W is decoded once per row block.
#include "common/simd.h"

#if METAL_MARLIN_X86

#include <algorithm>
#include <vector>

#include "common/decode_avx2.h"
#include "cpu/gemv.h"
#include "cpu/group_gemv.h"
#include "cpu/kernels.h"
#include "cpu/lane_order.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu {
namespace {

using avx2::BlockDecoder;

constexpr int kMicroRows = 6;          // activation rows per micro-kernel call
constexpr int64_t kTileCols = 16;      // rows of W per panel (two vectors)
constexpr int64_t kDepth = 256;        // K slice per panel: 16 x 256 floats = 16 KiB
constexpr int64_t kRowBlock = 120;     // activation rows per pass over W

METAL_MARLIN_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------
// GEMV (the loops are in group_gemv.h)

template <Format F, int M, int kChains>
struct GemvLanes {
  using Decoder = BlockDecoder<F>;
  __m256 offsets[M];
  __m256 chains[M][kChains];
  __m256 totals[M];

  METAL_MARLIN_AVX2 void clear_offsets() {
    for (int m = 0; m < M; ++m) offsets[m] = _mm256_setzero_ps();
  }
  METAL_MARLIN_AVX2 void add_scales(const uint16_t* row_scales, const uint16_t* row_offsets, const float* group_sums,
                                    int64_t n_groups, float* scales) {
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_scales)));
    _mm256_storeu_ps(scales, _mm256_mul_ps(s, _mm256_set1_ps(Decoder::kUnit)));
    if constexpr (FormatTraits<F>::kInteger) {
      const __m256 o = row_offsets ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_offsets)))
                                   : _mm256_mul_ps(s, _mm256_set1_ps(-kSymmetricMid<F>));
      for (int m = 0; m < M; ++m) {
        offsets[m] = _mm256_fmadd_ps(o, _mm256_loadu_ps(group_sums + m * n_groups), offsets[m]);
      }
    }
  }
  METAL_MARLIN_AVX2 float offset_sum(int m) const { return horizontal_sum(offsets[m]); }
  METAL_MARLIN_AVX2 void clear_totals() {
    for (int m = 0; m < M; ++m) totals[m] = _mm256_setzero_ps();
  }
  METAL_MARLIN_AVX2 void clear_chains() {
    for (int m = 0; m < M; ++m) {
      for (int c = 0; c < kChains; ++c) chains[m][c] = _mm256_setzero_ps();
    }
  }
  METAL_MARLIN_AVX2 void add_block(const uint32_t* block, const float* x_block, int chain_base) {
    __m256 lanes[4];
    Decoder::decode(block, lanes);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_load_ps(x_block + m * kBlockCodes + 8 * i);
        __m256& chain = chains[m][(chain_base + i) % kChains];
        chain = _mm256_fmadd_ps(lanes[i], xv, chain);
      }
    }
  }
  METAL_MARLIN_AVX2 void close_group(float group_scale) {
    const __m256 scale = _mm256_set1_ps(group_scale);
    for (int m = 0; m < M; ++m) {
      __m256 sum = chains[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, chains[m][c]);
      totals[m] = _mm256_fmadd_ps(sum, scale, totals[m]);
    }
  }
  METAL_MARLIN_AVX2 float total(int m) const { return horizontal_sum(totals[m]); }
};

// ---------------------------------------------------------------------------------------------
// GEMM

// Transposes the 8x8 matrix whose rows are r[0..7].
METAL_MARLIN_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// panel[kk][c] = W[n0 + c, k0 + kk'] for kk < depth, c < 16, where kk' follows the decoder's lane
// order within each block (the activations are permuted to match); rows past N are zero.
// `staging` holds 8 x 32 floats.
template <Format F>
METAL_MARLIN_AVX2 void decode_panel(const QuantizedMatrix& w, int64_t n0, int64_t k0, int64_t depth, float* panel,
                                    float* staging) {
  constexpr int kBits = FormatTraits<F>::kBits;
  const int64_t blocks_per_group = w.blocks_per_group();
  for (int64_t half = 0; half < kTileCols / 8; ++half) {
    const int64_t first_row = n0 + 8 * half;
    const int rows = int(std::clamp<int64_t>(w.n - first_row, 0, 8));
    const uint32_t* words[8];
    const uint16_t* scales[8];
    const uint16_t* offsets[8];
    for (int r = 0; r < rows; ++r) {
      words[r] = w.row_words(first_row + r);
      scales[r] = w.row_scales(first_row + r);
      offsets[r] = w.row_offsets(first_row + r);
    }
    for (int r = rows; r < 8; ++r) {
      for (int i = 0; i < 4; ++i) _mm256_store_ps(staging + r * kBlockCodes + 8 * i, _mm256_setzero_ps());
    }
    for (int64_t b = k0 / kBlockCodes; b < (k0 + depth) / kBlockCodes; ++b) {
      const int64_t g = b / blocks_per_group;
      for (int r = 0; r < rows; ++r) {
        const float scale = _cvtsh_ss(scales[r][g]);
        __m256 weights[4];
        avx2::decode_block_weights<F>(words[r] + b * kBits, scale, group_offset<F>(offsets[r], scale, g), weights);
        for (int i = 0; i < 4; ++i) _mm256_store_ps(staging + r * kBlockCodes + 8 * i, weights[i]);
      }
      float* panel_block = panel + (b * kBlockCodes - k0) * kTileCols + 8 * half;
      for (int i = 0; i < 4; ++i) {
        __m256 t[8];
        for (int r = 0; r < 8; ++r) t[r] = _mm256_load_ps(staging + r * kBlockCodes + 8 * i);
        transpose8(t);
        for (int j = 0; j < 8; ++j) _mm256_store_ps(panel_block + (8 * i + j) * kTileCols, t[j]);
      }
    }
  }
}

// c[r, 0:16] (+)= sum_kk x[r, kk] * panel[kk, 0:16] for r < MR.
template <int MR>
METAL_MARLIN_AVX2 void micro_kernel(const float* x, int64_t x_stride, const float* panel, int64_t depth, float* c,
                                    int64_t c_stride, bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < depth; ++kk) {
    const __m256 p0 = _mm256_load_ps(panel + kk * kTileCols);
    const __m256 p1 = _mm256_load_ps(panel + kk * kTileCols + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * x_stride + kk);
      acc[r][0] = _mm256_fmadd_ps(xr, p0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xr, p1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * c_stride;
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_load_ps(cr));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_load_ps(cr + 8));
    }
    _mm256_store_ps(cr, acc[r][0]);
    _mm256_store_ps(cr + 8, acc[r][1]);
  }
}

struct GemmPass {
  const float* x;     // [rows, k] activation rows m0.., permuted to lane order
  int64_t m0, rows;   // activation rows of this pass
  float* c;           // [rows, c_stride] float32 accumulators
  int64_t c_stride;   // N rounded up to whole tiles
  int64_t k0, depth;  // K slice of this pass
};

template <Format F>
METAL_MARLIN_AVX2 void gemm_tile(const MatmulArgs& args, const GemmPass& pass, int64_t tile, float* scratch) {
  const int64_t k = args.w.k;
  const int64_t n0 = tile * kTileCols;
  float* panel = scratch;
  decode_panel<F>(args.w, n0, pass.k0, pass.depth, panel, scratch + kDepth * kTileCols);

  const bool accumulate = pass.k0 > 0;
  const float* x = pass.x + pass.k0;
  float* c = pass.c + n0;
  int64_t r = 0;
  for (; r + kMicroRows <= pass.rows; r += kMicroRows) {
    micro_kernel<kMicroRows>(x + r * k, k, panel, pass.depth, c + r * pass.c_stride, pass.c_stride, accumulate);
  }
  const float* xr = x + r * k;
  float* cr = c + r * pass.c_stride;
  switch (pass.rows - r) {
    case 1: micro_kernel<1>(xr, k, panel, pass.depth, cr, pass.c_stride, accumulate); break;
    case 2: micro_kernel<2>(xr, k, panel, pass.depth, cr, pass.c_stride, accumulate); break;
    case 3: micro_kernel<3>(xr, k, panel, pass.depth, cr, pass.c_stride, accumulate); break;
    case 4: micro_kernel<4>(xr, k, panel, pass.depth, cr, pass.c_stride, accumulate); break;
    case 5: micro_kernel<5>(xr, k, panel, pass.depth, cr, pass.c_stride, accumulate); break;
    default: break;
  }

  if (pass.k0 + pass.depth == k) {
    const int64_t cols = std::min(kTileCols, args.w.n - n0);
    for (int64_t row = 0; row < pass.rows; ++row) store_outputs(args, pass.m0 + row, n0, cols, c + row * pass.c_stride);
  }
}

template <Format F>
void gemm(const MatmulArgs& args) {
  const int64_t k = args.w.k;
  const int64_t n_tiles = (args.w.n + kTileCols - 1) / kTileCols;
  const int64_t row_block = std::min(kRowBlock, args.m);
  GemmPass pass{};
  pass.c_stride = n_tiles * kTileCols;
  AlignedFloats x_block(row_block * k);
  AlignedFloats c_block(row_block * pass.c_stride);
  pass.x = x_block.data();
  pass.c = c_block.data();

  const int n_threads = plan_threads(args.n_threads, n_tiles);
  std::vector<AlignedFloats> scratch(size_t(n_threads), AlignedFloats(kDepth * kTileCols + 8 * kBlockCodes));
  std::vector<float> row(static_cast<size_t>(k));
  for (pass.m0 = 0; pass.m0 < args.m; pass.m0 += row_block) {
    pass.rows = std::min(row_block, args.m - pass.m0);
    for (int64_t r = 0; r < pass.rows; ++r) {
      load_activation_row(args, pass.m0 + r, row.data());
      permute_row<BlockDecoder<F>>(row.data(), k, [](int) { return 1.0f; }, x_block.data() + r * k);
    }
    for (pass.k0 = 0; pass.k0 < k; pass.k0 += kDepth) {
      pass.depth = std::min(kDepth, k - pass.k0);
      parallel_for(n_threads, n_tiles, [&](int64_t tile, int thread) {
        gemm_tile<F>(args, pass, tile, scratch[size_t(thread)].data());
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------

struct Avx2 {
  template <Format F>
  using Decoder = BlockDecoder<F>;
  static constexpr int kScaleLanes = 8;
  static constexpr int kBlocksPerStep = 1;  // a block is 4 vectors: enough independent FMAs
  static constexpr int gemv_chains(int m, bool one_block_groups) {
    return one_block_groups ? 1 : group_kernels::default_gemv_chains(m);
  }
  template <Format F, int M, int kChains>
  using GemvLanes = cpu::GemvLanes<F, M, kChains>;

  template <Format F>
  METAL_MARLIN_AVX2 static void decode_block(const uint32_t* block, float scale, float offset, float* staging) {
    __m256 weights[4];
    avx2::decode_block_weights<F>(block, scale, offset, weights);
    for (int i = 0; i < 4; ++i) _mm256_store_ps(staging + 8 * i, weights[i]);
  }
  template <Format F, int M, int kChains>
  METAL_MARLIN_AVX2 __attribute__((flatten)) static void gemv_rows(const MatmulArgs& args, const GemvInputs& in,
                                                                   int64_t row_begin, int64_t row_end, float* scales) {
    group_kernels::gemv_rows<Avx2, F, M, kChains>(args, in, row_begin, row_end, scales);
  }
  template <Format F>
  METAL_MARLIN_AVX2 __attribute__((flatten)) static void dequantize_rows(const QuantizedMatrix& w, float* out) {
    group_kernels::dequantize_rows<Avx2, F>(w, out);
  }
  template <Format F>
  static void gemm(const MatmulArgs& args) {
    cpu::gemm<F>(args);
  }
};

}  // namespace

void quant_matmul_avx2(const MatmulArgs& args) { group_kernels::quant_matmul<Avx2>(args); }

void dequantize_avx2(const QuantizedMatrix& w, float* out) { group_kernels::dequantize<Avx2>(w, out); }

void prepare_gemv_avx2(const QuantizedMatrix& w, const float* x, int64_t m, GemvInputs& in) {
  group_kernels::prepare_float_gemv<Avx2>(w, x, m, in);
}

void gemv_rows_avx2(const QuantizedMatrix& w, const GemvInputs& in, int64_t m, int64_t row_begin, int64_t row_end,
                    float* out) {
  group_kernels::float_gemv_rows<Avx2>(w, in, m, row_begin, row_end, out);
}

}  // namespace metal_marlin::cpu

#endif  // METAL_MARLIN_X86
