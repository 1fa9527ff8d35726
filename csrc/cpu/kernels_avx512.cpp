// AVX-512 (F/BW/VL) kernels, compiled with target attributes and chosen at run time.
//
// GEMV path (m <= 16, token generation): as in kernels_avx2.cpp (whole rows of W per thread,
// activations permuted to the decoder's lane order, scales applied once per group, offsets through
// the group sums of x), with 16-lane decoders and two blocks per step so that even a single
// activation row keeps four FMA chains in flight.
//
// GEMM path (m > 16, prefill): W is decoded once per pass over up to kPassRows activation rows, and
// each decoded tile is reused by all of them. For every kDepth-long slice of K, a task decodes
// kTileRows rows of W into a small row-major buffer (no transpose: the decoder's lane order is kept
// and x is permuted to match), then runs an 8 x 48 register-blocked micro-kernel over the pass's
// rows: 8 rows of W broadcast against 3 vectors of 16 activation rows. The activations are packed
// transposed ([48-row block][k][48]) so the micro-kernel's loads are contiguous, and the products
// accumulate transposed in a float32 buffer ct[n][m], written to out after the last slice.
#include "common/simd.h"

#if METAL_MARLIN_X86

#include <algorithm>
#include <vector>

#include "common/decode_avx512.h"
#include "cpu/gemv.h"
#include "cpu/group_gemv.h"
#include "cpu/kernels.h"
#include "cpu/lane_order.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu {
namespace {

using avx512::BlockDecoder;

constexpr int kTileRows = 8;                 // rows of W per GEMM task (broadcast operands)
constexpr int kXVectors = 3;                 // vectors of 16 activation rows per micro-kernel
constexpr int64_t kXBlock = 16 * kXVectors;  // activation rows per packed block
constexpr int64_t kDepth = 256;              // K slice: ct stays small, x slice stays in L2
constexpr int64_t kPassRows = 512;           // activation rows per pass over W

// ---------------------------------------------------------------------------------------------
// GEMV (the loops are in group_gemv.h)

template <Format F, int M, int kChains>
struct GemvLanes {
  using Decoder = BlockDecoder<F>;
  __m512 offsets[M];
  __m512 chains[M][kChains];
  __m512 totals[M];

  METAL_MARLIN_AVX512 void clear_offsets() {
    for (int m = 0; m < M; ++m) offsets[m] = _mm512_setzero_ps();
  }
  METAL_MARLIN_AVX512 void add_scales(const uint16_t* row_scales, const uint16_t* row_offsets,
                                      const float* group_sums, int64_t n_groups, float* scales) {
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_scales)));
    _mm512_storeu_ps(scales, _mm512_mul_ps(s, _mm512_set1_ps(Decoder::kUnit)));
    if constexpr (FormatTraits<F>::kInteger) {
      const __m512 o = row_offsets
                           ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_offsets)))
                           : _mm512_mul_ps(s, _mm512_set1_ps(-kSymmetricMid<F>));
      for (int m = 0; m < M; ++m) {
        offsets[m] = _mm512_fmadd_ps(o, _mm512_loadu_ps(group_sums + m * n_groups), offsets[m]);
      }
    }
  }
  METAL_MARLIN_AVX512 float offset_sum(int m) const { return _mm512_reduce_add_ps(offsets[m]); }
  METAL_MARLIN_AVX512 void clear_totals() {
    for (int m = 0; m < M; ++m) totals[m] = _mm512_setzero_ps();
  }
  METAL_MARLIN_AVX512 void clear_chains() {
    for (int m = 0; m < M; ++m) {
      for (int c = 0; c < kChains; ++c) chains[m][c] = _mm512_setzero_ps();
    }
  }
  METAL_MARLIN_AVX512 void add_block(const uint32_t* block, const float* x_block, int chain_base) {
    __m512 lanes[2];
    Decoder::decode(block, lanes);
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_load_ps(x_block + m * kBlockCodes + 16 * i);
        __m512& chain = chains[m][(chain_base + i) % kChains];
        chain = _mm512_fmadd_ps(lanes[i], xv, chain);
      }
    }
  }
  METAL_MARLIN_AVX512 void close_group(float group_scale) {
    const __m512 scale = _mm512_set1_ps(group_scale);
    for (int m = 0; m < M; ++m) {
      __m512 sum = chains[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, chains[m][c]);
      totals[m] = _mm512_fmadd_ps(sum, scale, totals[m]);
    }
  }
  METAL_MARLIN_AVX512 float total(int m) const { return _mm512_reduce_add_ps(totals[m]); }
};

// ---------------------------------------------------------------------------------------------
// GEMM

// tile[r][kk] = W[n0 + r, k0 + kk'] for r < kTileRows, kk < depth, kk' in the decoder's lane order
// within each block; rows past N are zero. Row stride kDepth.
template <Format F>
METAL_MARLIN_AVX512 void decode_tile(const QuantizedMatrix& w, int64_t n0, int64_t k0, int64_t depth, float* tile) {
  constexpr int kBits = FormatTraits<F>::kBits;
  const int64_t blocks_per_group = w.blocks_per_group();
  for (int r = 0; r < kTileRows; ++r) {
    float* dst = tile + r * kDepth;
    if (n0 + r >= w.n) {
      for (int64_t kk = 0; kk < depth; kk += 16) _mm512_store_ps(dst + kk, _mm512_setzero_ps());
      continue;
    }
    const uint32_t* words = w.row_words(n0 + r);
    const uint16_t* scales = w.row_scales(n0 + r);
    const uint16_t* offsets = w.row_offsets(n0 + r);
    for (int64_t b = k0 / kBlockCodes; b < (k0 + depth) / kBlockCodes; ++b) {
      const int64_t g = b / blocks_per_group;
      const float scale = _cvtsh_ss(scales[g]);
      __m512 weights[2];
      avx512::decode_block_weights<F>(words + b * kBits, scale, group_offset<F>(offsets, scale, g), weights);
      _mm512_store_ps(dst + b * kBlockCodes - k0, weights[0]);
      _mm512_store_ps(dst + b * kBlockCodes - k0 + 16, weights[1]);
    }
  }
}

// ct[r][16v .. 16v+16) (+)= sum_kk tile[r][kk] * xt[kk][16v .. 16v+16) for r < kTileRows, v < V.
template <int V>
METAL_MARLIN_AVX512 void micro_kernel(const float* xt, const float* tile, int64_t depth, float* ct, int64_t ct_stride,
                                      bool accumulate) {
  __m512 acc[kTileRows][V];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < depth; ++kk) {
    __m512 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = _mm512_load_ps(xt + kk * kXBlock + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 wr = _mm512_set1_ps(tile[r * kDepth + kk]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wr, xv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) {
    for (int v = 0; v < V; ++v) {
      float* c = ct + r * ct_stride + 16 * v;
      _mm512_store_ps(c, accumulate ? _mm512_add_ps(acc[r][v], _mm512_load_ps(c)) : acc[r][v]);
    }
  }
}

struct GemmPass {
  int64_t m0, rows;     // activation rows of this pass
  const float* xt;      // [blocks of kXBlock rows][k][kXBlock], permuted to lane order, zero-padded
  float* ct;            // [n_tiles * kTileRows][ct_stride] float32 accumulators, transposed
  int64_t ct_stride;    // rows rounded up to whole kXBlock blocks
  int64_t k0, depth;    // K slice
  int64_t row_splits;   // tasks per tile: the pass's row blocks are split this many ways
};

template <Format F>
METAL_MARLIN_AVX512 void gemm_task(const MatmulArgs& args, const GemmPass& pass, int64_t task, float* tile) {
  const int64_t k = args.w.k;
  const int64_t n0 = task / pass.row_splits * kTileRows;
  const int64_t split = task % pass.row_splits;
  const int64_t n_blocks = pass.ct_stride / kXBlock;
  const int64_t block_begin = n_blocks * split / pass.row_splits;
  const int64_t block_end = n_blocks * (split + 1) / pass.row_splits;
  if (block_begin == block_end) return;
  decode_tile<F>(args.w, n0, pass.k0, pass.depth, tile);

  const bool accumulate = pass.k0 > 0;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const float* xt = pass.xt + (b * k + pass.k0) * kXBlock;
    float* ct = pass.ct + n0 * pass.ct_stride + b * kXBlock;
    const int64_t live_rows = std::min(kXBlock, pass.rows - b * kXBlock);
    switch ((live_rows + 15) / 16) {  // skip the zero padding of the last block
      case 1: micro_kernel<1>(xt, tile, pass.depth, ct, pass.ct_stride, accumulate); break;
      case 2: micro_kernel<2>(xt, tile, pass.depth, ct, pass.ct_stride, accumulate); break;
      default: micro_kernel<3>(xt, tile, pass.depth, ct, pass.ct_stride, accumulate); break;
    }
  }

  if (pass.k0 + pass.depth == k) {
    const int64_t cols = std::min<int64_t>(kTileRows, args.w.n - n0);
    const int64_t row_end = std::min(pass.rows, block_end * kXBlock);
    float values[kTileRows];
    for (int64_t row = block_begin * kXBlock; row < row_end; ++row) {
      for (int64_t c = 0; c < cols; ++c) values[c] = pass.ct[(n0 + c) * pass.ct_stride + row];
      store_outputs(args, pass.m0 + row, n0, cols, values);
    }
  }
}

template <Format F>
void gemm(const MatmulArgs& args) {
  const int64_t k = args.w.k;
  const int64_t n_tiles = (args.w.n + kTileRows - 1) / kTileRows;
  const int64_t pass_rows = std::min(kPassRows, args.m);
  const int64_t max_blocks = (pass_rows + kXBlock - 1) / kXBlock;
  GemmPass pass{};
  pass.ct_stride = max_blocks * kXBlock;
  // Reused across calls (grown, never shrunk): every call overwrites what it reads, and a prefill
  // makes hundreds of calls whose buffers would otherwise be allocated and zeroed each time.
  thread_local AlignedFloats xt, ct;
  xt.reserve_zeroed(max_blocks * k * kXBlock);
  ct.reserve_zeroed(n_tiles * kTileRows * pass.ct_stride);
  float* const xt_data = xt.data();  // the caller's buffers: workers have their own thread_locals
  pass.xt = xt_data;
  pass.ct = ct.data();

  // Few tiles (small N): split each tile's row blocks so that every thread gets work.
  const int64_t wanted = std::max(1, args.n_threads);
  pass.row_splits = std::min(max_blocks, (wanted + n_tiles - 1) / n_tiles);
  const int64_t n_tasks = n_tiles * pass.row_splits;
  const int n_threads = plan_threads(args.n_threads, n_tasks);
  std::vector<AlignedFloats> scratch(size_t(n_threads), AlignedFloats(kTileRows * kDepth));
  for (pass.m0 = 0; pass.m0 < args.m; pass.m0 += pass_rows) {
    pass.rows = std::min(pass_rows, args.m - pass.m0);
    // Pack the pass's activations block by block over the threads (zero rows pad the last block).
    const int64_t blocks = (pass.rows + kXBlock - 1) / kXBlock;
    parallel_for(plan_threads(args.n_threads, blocks), blocks, [&](int64_t b, int) {
      thread_local std::vector<float> row, permuted;
      row.resize(size_t(k));
      permuted.resize(size_t(k));
      float* block = xt_data + b * k * kXBlock;
      const int64_t live = std::min(kXBlock, pass.rows - b * kXBlock);
      if (live < kXBlock) std::fill_n(block, k * kXBlock, 0.0f);
      for (int64_t r = 0; r < live; ++r) {
        load_activation_row(args, pass.m0 + b * kXBlock + r, row.data());
        permute_row<BlockDecoder<F>>(row.data(), k, [](int) { return 1.0f; }, permuted.data());
        for (int64_t kk = 0; kk < k; ++kk) block[kk * kXBlock + r] = permuted[size_t(kk)];
      }
    });
    for (pass.k0 = 0; pass.k0 < k; pass.k0 += kDepth) {
      pass.depth = std::min(kDepth, k - pass.k0);
      parallel_for(n_threads, n_tasks, [&](int64_t task, int thread) {
        gemm_task<F>(args, pass, task, scratch[size_t(thread)].data());
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------

struct Avx512 {
  template <Format F>
  using Decoder = BlockDecoder<F>;
  static constexpr int kScaleLanes = 16;
  // Two blocks (4 vectors) per step, so that even a single activation row keeps four FMA chains
  // in flight.
  static constexpr int kBlocksPerStep = 2;
  static constexpr int gemv_chains(int m, bool) { return group_kernels::default_gemv_chains(m); }
  template <Format F, int M, int kChains>
  using GemvLanes = cpu::GemvLanes<F, M, kChains>;

  template <Format F>
  METAL_MARLIN_AVX512 static void decode_block(const uint32_t* block, float scale, float offset, float* staging) {
    __m512 weights[2];
    avx512::decode_block_weights<F>(block, scale, offset, weights);
    _mm512_store_ps(staging, weights[0]);
    _mm512_store_ps(staging + 16, weights[1]);
  }
  template <Format F, int M, int kChains>
  METAL_MARLIN_AVX512 __attribute__((flatten)) static void gemv_rows(const MatmulArgs& args, const GemvInputs& in,
                                                                     int64_t row_begin, int64_t row_end,
                                                                     float* scales) {
    group_kernels::gemv_rows<Avx512, F, M, kChains>(args, in, row_begin, row_end, scales);
  }
  template <Format F>
  METAL_MARLIN_AVX512 __attribute__((flatten)) static void dequantize_rows(const QuantizedMatrix& w, float* out) {
    group_kernels::dequantize_rows<Avx512, F>(w, out);
  }
  template <Format F>
  static void gemm(const MatmulArgs& args) {
    cpu::gemm<F>(args);
  }
};

}  // namespace

void quant_matmul_avx512(const MatmulArgs& args) { group_kernels::quant_matmul<Avx512>(args); }

void dequantize_avx512(const QuantizedMatrix& w, float* out) { group_kernels::dequantize<Avx512>(w, out); }

void prepare_gemv_avx512(const QuantizedMatrix& w, const float* x, int64_t m, GemvInputs& in) {
  group_kernels::prepare_float_gemv<Avx512>(w, x, m, in);
}

void gemv_rows_avx512(const QuantizedMatrix& w, const GemvInputs& in, int64_t m, int64_t row_begin, int64_t row_end,
                    float* out) {
  group_kernels::float_gemv_rows<Avx512>(w, in, m, row_begin, row_end, out);
}

}  // namespace metal_marlin::cpu

#endif  // METAL_MARLIN_X86
