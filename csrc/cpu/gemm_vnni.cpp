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
//
// With AMX (avx512_amx) the same panels feed the tile unit: per 32-block, one tdpbusd of a 16 x 32
// tile of weight codes by the 8 x 64 high (and low) activation tile gives 16 x 16 int32 sums, which the
// vector unit scales into float accumulators as above. The tile unit does 8192 multiply-adds per
// instruction pair; the float epilogue per 32-block is what remains on the vector ports.
#include "common/simd.h"

#if METAL_MARLIN_X86

#include <cpuid.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/gemv.h"
#include "cpu/thread_pool.h"
#include "cpu/vnni_activations.h"

#define METAL_MARLIN_AMX \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
  for (int64_t r = 0; r < live; ++r) {
    const float* row = x + r * k;
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m512i t[2];
      scales[b * kRowBlock + r] = quantize_block(row + b * kBlockCodes, t);
      for (int v = 0; v < 2; ++v) {
        int8_t hb[16], lb[16];
        split_bytes(t[v], hb, lb);
        // Element kk of the block goes to [(k index) / 4][r][(k index) % 4].
        for (int j = 0; j < 16; ++j) {
          const int64_t kk = b * kBlockCodes + 16 * v + j;
          high[(kk / 4) * kRowBlock * 4 + r * 4 + kk % 4] = hb[j];
          low[(kk / 4) * kRowBlock * 4 + r * 4 + kk % 4] = lb[j];
        }
      }
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      sums[g * kRowBlock + r] = group_sum(row, g * group_size, std::min(k, (g + 1) * group_size));
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
                                           Panels& p, int64_t rb, float acc_out[][kRowBlock]) {
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


// ---- AMX ----------------------------------------------------------------------------------------------

constexpr int kAmxRows = 16;  // rows of W per tile (two decode_tile calls)

// Tiles 0, 1 and 5, 6: high and low int32 sums [16 W rows][16 activation rows] (two sets); 2: weight
// codes [16][32 bytes]; 3, 4: high and low activations [8 = 32 / 4][64 bytes]. The LDTILECFG operand (palette 1): byte 0
// palette, bytes 16 + 2t: tile t's bytes per row, byte 48 + t: its rows.
METAL_MARLIN_AMX void load_amx_config() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;
  const auto set = [&cfg](int tile, int rows, int bytes_per_row) {
    cfg[16 + 2 * tile] = uint8_t(bytes_per_row);
    cfg[16 + 2 * tile + 1] = uint8_t(bytes_per_row >> 8);
    cfg[48 + tile] = uint8_t(rows);
  };
  set(0, 16, 64);
  set(1, 16, 64);
  set(2, 16, 32);
  set(3, 8, 64);
  set(4, 8, 64);
  set(5, 16, 64);
  set(6, 16, 64);
  // GCC's _tile_loadconfig does not tell the optimizer it reads the buffer: keep the stores.
  asm volatile("" : : "r"(cfg) : "memory");
  _tile_loadconfig(cfg);
}

// The int32 sums of one 32-block into sum_high/sum_low through sum tiles HIGH, LOW. A macro: GCC's tile
// intrinsics paste the tile number into the instruction text, so it must be a literal.
#define METAL_MARLIN_AMX_BLOCK(HIGH, LOW, codes, k, high, low, sum_high, sum_low) \
  do {                                                                            \
    _tile_zero(HIGH);                                                             \
    _tile_zero(LOW);                                                              \
    _tile_loadd(2, codes, k);                                                     \
    _tile_loadd(3, high, 64);                                                     \
    _tile_loadd(4, low, 64);                                                      \
    _tile_dpbusd(HIGH, 2, 3);                                                     \
    _tile_dpbusd(LOW, 2, 4);                                                      \
    _tile_stored(HIGH, sum_high, 64);                                             \
    _tile_stored(LOW, sum_low, 64);                                               \
  } while (0)

// 16 W rows x 16 activation rows of block rb into acc_out[W row][activation row].
METAL_MARLIN_AMX void amx_kernel(const uint8_t* codes, const float* block_scales, const float* offsets, Panels& p,
                                 int64_t rb, float acc_out[kAmxRows][kRowBlock]) {
  const int64_t k = p.k, n_blocks = k / kBlockCodes;
  const int8_t* high = p.high_of(rb);
  const int8_t* low = p.low_of(rb);
  const float* d = p.scales_of(rb);
  alignas(64) int32_t sum_high[2][kAmxRows][kRowBlock], sum_low[2][kAmxRows][kRowBlock];
  __m512 acc[kAmxRows];
  for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
  // Block b's sums go to set b % 2 (tiles 0, 1 or 5, 6), so that the tile unit computes block b + 1
  // while the vector unit scales block b.
  for (int64_t b = 0; b <= n_blocks; ++b) {
    if (b < n_blocks) {
      const uint8_t* a = codes + b * kBlockCodes;
      const int8_t *h = high + b * kBlockCodes * kRowBlock, *l = low + b * kBlockCodes * kRowBlock;
      if (b & 1) {
        METAL_MARLIN_AMX_BLOCK(5, 6, a, k, h, l, sum_high[1], sum_low[1]);
      } else {
        METAL_MARLIN_AMX_BLOCK(0, 1, a, k, h, l, sum_high[0], sum_low[0]);
      }
    }
    if (b == 0) continue;
    const int64_t prev = b - 1;  // scale the previous block
    const int set = int(prev & 1);
    const __m512 db = _mm512_load_ps(d + prev * kRowBlock);
#pragma GCC unroll 16
    for (int r = 0; r < kAmxRows; ++r) {
      const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sum_high[set][r]), 8),
                                            _mm512_load_si512(sum_low[set][r]));
      const __m512 scale = _mm512_mul_ps(db, _mm512_set1_ps(block_scales[r * n_blocks + prev]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
    }
  }
  const float* sums = p.sums_of(rb);
  for (int64_t g = 0; g < p.groups; ++g) {
    const __m512 xg = _mm512_load_ps(sums + g * kRowBlock);
    for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(offsets[r * p.groups + g]), xg, acc[r]);
  }
  for (int r = 0; r < kAmxRows; ++r) _mm512_storeu_ps(acc_out[r], acc[r]);
}

bool request_amx_state() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// out[row0 + r, n0 + c] = tile[c][r] (+ bias) for r < live, c < cols.
void store_tile(const MatmulArgs& args, int64_t row0, int64_t live, int64_t n0, int64_t cols,
                const float tile[][kRowBlock]) {
  if (args.dtype == DType::kFloat32 && !args.bias) {  // the common case, without store_outputs' per-element dispatch
    float* out = static_cast<float*>(args.out) + row0 * args.w.n + n0;
    for (int64_t r = 0; r < live; ++r) {
      for (int64_t c = 0; c < cols; ++c) out[r * args.w.n + c] = tile[c][r];
    }
    return;
  }
  float values[kAmxRows];
  for (int64_t r = 0; r < live; ++r) {
    for (int64_t c = 0; c < cols; ++c) values[c] = tile[c][r];
    store_outputs(args, row0 + r, n0, cols, values);
  }
}

template <Format F>
void gemm(const MatmulArgs& args, bool amx) {
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
      codes.reserve_zeroed(kAmxRows * k);
      scales.reserve_zeroed(kAmxRows * n_blocks);
      offsets.reserve_zeroed(kAmxRows * groups);
      if (amx) load_amx_config();  // per thread; cheap next to a task
      const int64_t split = task % splits;
      // With AMX a task's two 8-row tiles are one 16-row tile.
      const int64_t tile_rows = amx ? kAmxRows : kTileRows;
      const int64_t n_begin = task / splits * kTilesPerTask * kTileRows;
      const int64_t n_end = std::min(w.n, n_begin + kTilesPerTask * kTileRows);
      alignas(64) float tile_out[kAmxRows][kRowBlock];
      for (int64_t n0 = n_begin; n0 < n_end; n0 += tile_rows) {
        for (int64_t half = 0; half < tile_rows; half += kTileRows) {
          decode_tile<F>(w, n0 + half, codes.data() + half * k, scales.data() + half * n_blocks,
                         offsets.data() + half * groups);
        }
        const int64_t cols = std::min(tile_rows, w.n - n0);
        for (int64_t rb = p->blocks * split / splits; rb < p->blocks * (split + 1) / splits; ++rb) {
          if (amx) {
            amx_kernel(codes.data(), scales.data(), offsets.data(), *p, rb, tile_out);
          } else {
            micro_kernel(codes.data(), scales.data(), offsets.data(), *p, rb, tile_out);
          }
          store_tile(args, m0 + rb * kRowBlock, std::min(kRowBlock, rows - rb * kRowBlock), n0, cols, tile_out);
        }
      }
    });
  }
}

}  // namespace

bool cpu_has_amx_int8() {
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);  // CPUID.(7,0):EDX AMX-TILE, AMX-INT8
    return tile && int8 && cpu_has_avx512_vnni() && request_amx_state();
  }();
  return has;
}

void quant_matmul_vnni_gemm(const MatmulArgs& args, bool amx) {
  if (args.w.format == Format::kInt4) return gemm<Format::kInt4>(args, amx);
  gemm<Format::kInt8>(args, amx);
}

}  // namespace metal_marlin::cpu

#endif  // METAL_MARLIN_X86
