// The integer GEMM (prefill, more than 16 activation rows) for int4 and int8 weights on AVX-512 VNNI.
//
// The activations get the GEMV's 16-bit fixed point per 32-block (gemv_vnni.cpp: t = round(x / d_b) =
// 256 * high + low), so every row count computes the same products within the same bound
// (docs/kernels.md). They are packed per block of 16 rows as [k / 4][16 rows][4 bytes], high and low
// bytes apart: one vector holds 4 consecutive k of 16 rows, which is what vpdpbusd multiplies by a
// broadcast of 4 weight codes. A task decodes 8 rows of W into unsigned code bytes in k order (int8
// codes are already that), then for each block of 16 activation rows runs an 8 x 16 micro-kernel:
// per 32-block, 16 vpdpbusd per weight row accumulate int32 sums that are then scaled by s_g * d_b
// into float accumulators. vpdpbusd does 64 multiply-adds (32 after the high/low split), a float FMA 16.
// The offset terms o_g * sum(x over g) use the exact float group sums, as in the GEMV.
#include "common/simd.h"

#if METAL_MARLIN_X86

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/gemv.h"
#include "cpu/thread_pool.h"

#define METAL_MARLIN_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace metal_marlin::cpu {
namespace {

constexpr int kTileRows = 8;          // rows of W per micro-kernel tile
constexpr int64_t kTilesPerTask = 2;  // 16 output columns: one 64-byte line of float32 outputs
constexpr int64_t kRowBlock = 16;     // activation rows per vector
constexpr int64_t kPassRows = 512;    // activation rows per pass over W

// One pass's activations: per block of 16 rows, high and low bytes [k / 4][16][4], block scales
// [k / 32][16] and group sums [groups][16] (zero for padding rows).
struct Panels {
  int64_t k = 0, groups = 0, blocks = 0;  // blocks: of 16 rows
  AlignedBuffer<int8_t> high, low;
  AlignedFloats scales, sums;
  int8_t* high_of(int64_t rb) { return high.data() + rb * k * kRowBlock; }
  int8_t* low_of(int64_t rb) { return low.data() + rb * k * kRowBlock; }
  float* scales_of(int64_t rb) { return scales.data() + rb * (k / kBlockCodes) * kRowBlock; }
  float* sums_of(int64_t rb) { return sums.data() + rb * groups * kRowBlock; }
};

// Packs activation rows [r0, r0 + live) (float32, [live, k]) into row block rb.
METAL_MARLIN_AVX512_VNNI void pack_block(const float* x, int64_t live, int64_t group_size, Panels& p, int64_t rb) {
  const int64_t k = p.k, n_blocks = k / kBlockCodes;
  int8_t* high = p.high_of(rb);
  int8_t* low = p.low_of(rb);
  float* scales = p.scales_of(rb);
  float* sums = p.sums_of(rb);
  if (live < kRowBlock) {
    std::memset(high, 0, size_t(k * kRowBlock));
    std::memset(low, 0, size_t(k * kRowBlock));
    std::fill_n(scales, n_blocks * kRowBlock, 0.0f);
    std::fill_n(sums, p.groups * kRowBlock, 0.0f);
  }
  const __m512 range = _mm512_set1_ps(float(kVnniRange));
  const __m512i hi_limit = _mm512_set1_epi32(kVnniRange), lo_limit = _mm512_set1_epi32(-kVnniRange);
  for (int64_t r = 0; r < live; ++r) {
    const float* row = x + r * k;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const __m512 v0 = _mm512_loadu_ps(row + b * kBlockCodes), v1 = _mm512_loadu_ps(row + b * kBlockCodes + 16);
      const float max_abs = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      __m512i t[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
      float d = 0.0f;
      if (max_abs > 0.0f) {
        const __m512 inv = _mm512_div_ps(range, _mm512_set1_ps(max_abs));
        t[0] = _mm512_max_epi32(lo_limit, _mm512_min_epi32(hi_limit, _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv))));
        t[1] = _mm512_max_epi32(lo_limit, _mm512_min_epi32(hi_limit, _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv))));
        d = max_abs / float(kVnniRange);
      }
      scales[b * kRowBlock + r] = d;
      for (int v = 0; v < 2; ++v) {
        const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(t[v], _mm512_set1_epi32(128)), 8);
        const __m512i l = _mm512_sub_epi32(t[v], _mm512_slli_epi32(h, 8));
        alignas(16) int8_t hb[16], lb[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(hb), _mm512_cvtepi32_epi8(h));
        _mm_store_si128(reinterpret_cast<__m128i*>(lb), _mm512_cvtepi32_epi8(l));
        // Element kk of the block goes to [(k index) / 4][r][(k index) % 4].
        for (int j = 0; j < 16; ++j) {
          const int64_t kk = b * kBlockCodes + 16 * v + j;
          high[(kk / 4) * kRowBlock * 4 + r * 4 + kk % 4] = hb[j];
          low[(kk / 4) * kRowBlock * 4 + r * 4 + kk % 4] = lb[j];
        }
      }
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t end = std::min(k, (g + 1) * group_size);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = g * group_size; j < end; j += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(row + j));
      sums[g * kRowBlock + r] = _mm512_reduce_add_ps(acc);
    }
  }
}

// Code bytes of W rows [n0, n0 + 8) in k order (rows past N: zero), their scales per 32-block and
// their offsets per group (o_g, or -mid * s_g when symmetric).
template <Format F>
METAL_MARLIN_AVX512_VNNI void decode_tile(const QuantizedMatrix& w, int64_t n0, uint8_t* codes, float* block_scales,
                                          float* offsets) {
  const int64_t k = w.k, n_blocks = w.blocks_per_row(), groups = w.groups_per_row(), bpg = w.blocks_per_group();
  for (int r = 0; r < kTileRows; ++r) {
    uint8_t* dst = codes + r * k;
    if (n0 + r >= w.n) {
      std::memset(dst, 0, size_t(k));
      std::fill_n(block_scales + r * n_blocks, n_blocks, 0.0f);
      std::fill_n(offsets + r * groups, groups, 0.0f);
      continue;
    }
    const auto* src = reinterpret_cast<const uint8_t*>(w.row_words(n0 + r));
    if constexpr (F == Format::kInt8) {
      std::memcpy(dst, src, size_t(k));
    } else {
      // Byte j of a 16-byte block holds codes 2j (low nibble) and 2j + 1: interleave the nibbles.
      const __m128i mask = _mm_set1_epi8(0x0F);
      for (int64_t b = 0; b < n_blocks; ++b) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * b));
        const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * b), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * b + 16), _mm_unpackhi_epi8(lo, hi));
      }
    }
    const uint16_t* s16 = w.row_scales(n0 + r);
    const uint16_t* o16 = w.row_offsets(n0 + r);
    for (int64_t b = 0; b < n_blocks; ++b) block_scales[r * n_blocks + b] = half_to_float(s16[b / bpg]);
    for (int64_t g = 0; g < groups; ++g) offsets[r * groups + g] = group_offset<F>(o16, half_to_float(s16[g]), g);
  }
}

// out rows of activation block rb (live rows), columns [n0, n0 + 8): the 8 x 16 micro-kernel over K.
METAL_MARLIN_AVX512_VNNI void micro_kernel(const uint8_t* codes, const float* block_scales, const float* offsets,
                                           Panels& p, int64_t rb, float acc_out[kTileRows][kRowBlock]) {
  const int64_t k = p.k, n_blocks = k / kBlockCodes;
  const int8_t* high = p.high_of(rb);
  const int8_t* low = p.low_of(rb);
  const float* d = p.scales_of(rb);
  __m512 acc[kTileRows];
  for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m512i sum_high[kTileRows], sum_low[kTileRows];
    for (int r = 0; r < kTileRows; ++r) sum_high[r] = sum_low[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int q = 0; q < kBlockCodes / 4; ++q) {
      const int64_t k4 = b * (kBlockCodes / 4) + q;
      const __m512i xh = _mm512_load_si512(high + k4 * 64), xl = _mm512_load_si512(low + k4 * 64);
#pragma GCC unroll 8
      for (int r = 0; r < kTileRows; ++r) {
        int32_t quad;
        std::memcpy(&quad, codes + r * k + 4 * k4, 4);
        const __m512i wq = _mm512_set1_epi32(quad);
        sum_high[r] = _mm512_dpbusd_epi32(sum_high[r], wq, xh);
        sum_low[r] = _mm512_dpbusd_epi32(sum_low[r], wq, xl);
      }
    }
    const __m512 db = _mm512_load_ps(d + b * kRowBlock);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sum_high[r], 8), sum_low[r]));
      acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(db, _mm512_set1_ps(block_scales[r * n_blocks + b])), acc[r]);
    }
  }
  const float* sums = p.sums_of(rb);
  for (int64_t g = 0; g < p.groups; ++g) {
    const __m512 xg = _mm512_load_ps(sums + g * kRowBlock);
    for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(offsets[r * p.groups + g]), xg, acc[r]);
  }
  for (int r = 0; r < kTileRows; ++r) _mm512_storeu_ps(acc_out[r], acc[r]);
}

template <Format F>
void gemm(const MatmulArgs& args) {
  const QuantizedMatrix& w = args.w;
  const int64_t k = w.k, groups = w.groups_per_row(), n_blocks = w.blocks_per_row();
  const int64_t n_tiles = (w.n + kTileRows - 1) / kTileRows;
  thread_local Panels panels;  // reused across calls; workers get the pointer, not their own copy
  Panels* p = &panels;
  const int64_t pass_rows = std::min(kPassRows, args.m);
  p->k = k;
  p->groups = groups;
  const int64_t max_blocks = (pass_rows + kRowBlock - 1) / kRowBlock;
  p->high.reserve_zeroed(max_blocks * k * kRowBlock);
  p->low.reserve_zeroed(max_blocks * k * kRowBlock);
  p->scales.reserve_zeroed(max_blocks * n_blocks * kRowBlock);
  p->sums.reserve_zeroed(max_blocks * groups * kRowBlock);
  for (int64_t m0 = 0; m0 < args.m; m0 += pass_rows) {
    const int64_t rows = std::min(pass_rows, args.m - m0);
    p->blocks = (rows + kRowBlock - 1) / kRowBlock;
    parallel_for(plan_threads(args.n_threads, p->blocks), p->blocks, [&](int64_t rb, int) {
      thread_local std::vector<float> x;
      const int64_t first = m0 + rb * kRowBlock, live = std::min(kRowBlock, m0 + rows - first);
      x.resize(size_t(live * k));
      for (int64_t r = 0; r < live; ++r) load_activation_row(args, first + r, x.data() + r * k);
      pack_block(x.data(), live, w.group_size, *p, rb);
    });
    // A task takes kTilesPerTask adjacent tiles, so threads write whole cache lines of the output
    // (16 float32 columns) instead of sharing them. Few tasks (small N): split the row blocks too.
    const int64_t n_groups_of_tiles = (n_tiles + kTilesPerTask - 1) / kTilesPerTask;
    const int64_t splits = std::min(p->blocks, (std::max(1, args.n_threads) + n_groups_of_tiles - 1) /
                                                   n_groups_of_tiles);
    const int64_t n_tasks = n_groups_of_tiles * splits;
    parallel_for(plan_threads(args.n_threads, n_tasks), n_tasks, [&](int64_t task, int) {
      thread_local AlignedBuffer<uint8_t> codes;
      thread_local AlignedFloats scales, offsets;
      codes.reserve_zeroed(kTileRows * k);
      scales.reserve_zeroed(kTileRows * n_blocks);
      offsets.reserve_zeroed(kTileRows * groups);
      const int64_t split = task % splits;
      const int64_t first_tile = task / splits * kTilesPerTask;
      const int64_t end_tile = std::min(n_tiles, first_tile + kTilesPerTask);
      alignas(64) float tile_out[kTileRows][kRowBlock];
      for (int64_t tile = first_tile; tile < end_tile; ++tile) {
        const int64_t n0 = tile * kTileRows;
        decode_tile<F>(w, n0, codes.data(), scales.data(), offsets.data());
        const int64_t cols = std::min<int64_t>(kTileRows, w.n - n0);
        for (int64_t rb = p->blocks * split / splits; rb < p->blocks * (split + 1) / splits; ++rb) {
          micro_kernel(codes.data(), scales.data(), offsets.data(), *p, rb, tile_out);
          const int64_t live = std::min(kRowBlock, rows - rb * kRowBlock);
          float values[kTileRows];
          for (int64_t r = 0; r < live; ++r) {
            for (int64_t c = 0; c < cols; ++c) values[c] = tile_out[c][r];
            store_outputs(args, m0 + rb * kRowBlock + r, n0, cols, values);
          }
        }
      }
    });
  }
}

}  // namespace

void quant_matmul_vnni_gemm(const MatmulArgs& args) {
  if (args.w.format == Format::kInt4) return gemm<Format::kInt4>(args);
  gemm<Format::kInt8>(args);
}

}  // namespace metal_marlin::cpu

#endif  // METAL_MARLIN_X86
