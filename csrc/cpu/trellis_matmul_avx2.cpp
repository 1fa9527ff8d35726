// AVX2 + FMA + F16C trellis matmul (for x86-64 CPUs without the AVX-512 trellis extensions).
//
// Decode works on row units, 8 states per vector in 32-bit lanes: unit u holds tile row u / 2,
// columns 8 (u % 2) .. 8 (u % 2) + 7. Per vector:
//   states: the unit's windows lie in 16 bytes of the tile (4 words; the units at the start of the
//     tile, whose windows wrap around the ring, read [last word, words 0..2]), broadcast to both
//     128-bit halves; one byte shuffle gives each lane stream bytes B, B + 1, B + 2 (B = start bit / 8)
//     as a big-endian word, and shifting left by start bit % 8, then right by 16 extracts the state;
//   codebook: x = s * mul + add (vpmulld); 3inst/mcg: each masked FP16 half becomes a float32 by
//     shifting its fields into place (shift, and, xor), the exact float32 sum is rounded to FP16 once
//     (vcvtps2ph) as the spec does; 1mad/mul1: byte sums with vpmaddubsw + vpmaddwd.
// The GEMV accumulates 8-column partial sums per (row of x, tile row) and reduces them at the end;
// the GEMM transposes each decoded tile into its [K, 16] panel.
#include "cpu/trellis_kernels.h"

#if METAL_MARLIN_X86

#include <algorithm>
#include <stdexcept>

#include "cpu/trellis_matmul_driver.h"

namespace metal_marlin::cpu::trellis_cpu {
namespace {

using metal_marlin::trellis::words_per_tile;

constexpr int kUnits = 32;

// Where each row unit of a tile with `bits` bits per step finds its states.
struct RowPlan {
  alignas(32) uint8_t shuffle[kUnits][32];  // vpshufb control: lane c gets window bytes of stream B, B+1, B+2
  alignas(32) uint32_t shift[kUnits][8];    // start bit % 8
  int window[kUnits];                       // first tile word of the unit's 16-byte window; -1: the ring window
};

void build_plan(int bits, RowPlan& plan) {
  const int last_window = words_per_tile(bits) - 4;
  for (int u = 0; u < kUnits; ++u) {
    // Start bits without the ring's wrap: negative for the first steps of the tile.
    int start[8];
    for (int c = 0; c < 8; ++c) start[c] = (8 * u + c + 1) * bits - trellis::kStateBits;
    const int w0 = start[0] < 0 ? -1 : std::min((start[0] >> 3) >> 2, last_window);
    plan.window[u] = w0;
    for (int c = 0; c < 8; ++c) {
      const int b = start[c] >> 3;  // floor: stream byte -1 or -2 is in the ring's last word
      const int shift = start[c] & 7;
      uint8_t* ctrl = plan.shuffle[u] + 4 * c;  // dword c: byte 4 (c % 4) of half c / 4
      for (int i = 0; i < 4; ++i) {
        const int offset = b + i - 4 * w0;      // in the window
        const bool needed = i < 2 || (i == 2 && shift > 0);
        if (needed && (offset < 0 || offset >= 16)) {
          throw std::logic_error("trellis row plan: the window does not hold the unit");
        }
        ctrl[3 - i] = needed ? uint8_t(memory_byte(offset)) : 0x80;  // 0x80: zero
      }
      plan.shift[u][c] = uint32_t(shift);
    }
  }
}

// The ring window [last word, words 0, 1, 2] of a tile, in both halves.
METAL_MARLIN_AVX2 inline __m256i ring_window(const uint32_t* tile, int words) {
  const __m128i head = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile));
  const __m128i tail = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + words - 4));
  return _mm256_broadcastsi128_si256(_mm_alignr_epi8(head, tail, 12));
}

METAL_MARLIN_AVX2 inline __m256i unit_states(const uint32_t* tile, __m256i ring, const RowPlan& plan, int u) {
  const int w0 = plan.window[u];
  const __m256i window =
      w0 < 0 ? ring : _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + w0)));
  const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(plan.shuffle[u]));
  const __m256i bytes = _mm256_shuffle_epi8(window, control);
  const __m256i shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(plan.shift[u]));
  return _mm256_srli_epi32(_mm256_sllv_epi32(bytes, shift), 16);
}

METAL_MARLIN_AVX2 inline __m256i byte_sum(__m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
}

METAL_MARLIN_AVX2 inline __m256 round_to_half(__m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <Codebook CB>
METAL_MARLIN_AVX2 inline __m256 unit_values(__m256i s) {
  if constexpr (CB == Codebook::k3inst || CB == Codebook::kMcg) {
    __m256i x;
    if constexpr (CB == Codebook::k3inst) {
      x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::k3instMul))),
                           _mm256_set1_epi32(int(trellis::k3instAdd)));
    } else {
      x = _mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::kMcgMul)));
    }
    // The mask and xor fix each half's exponent field to 0b011xx: a normal FP16 number. Its float32 is
    // built straight from the raw half (in the top 16 bits): an arithmetic shift right by 3 puts sign,
    // the two free exponent bits and the mantissa in place; the and keeps them and the xor applies the
    // spec's xor to them and sets the rest of the exponent (12 + 112 bias difference = 0b01111100).
    static_assert(trellis::kHalfMask == 0x8FFF8FFFu && trellis::kHalfXor == 0x3B603B60u, "the fields below");
    const __m256i keep = _mm256_set1_epi32(int(0x81FFE000u));
    const __m256i flip = _mm256_set1_epi32(0x3F6C0000);  // exponent bits 29..25, 0xB60 << 13
    const __m256 lo = _mm256_castsi256_ps(
        _mm256_xor_si256(_mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(x, 16), 3), keep), flip));
    const __m256 hi = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_and_si256(_mm256_srai_epi32(x, 3), keep), flip));
    // Both in [1/8, 2): the float32 sum is exact and rounding it to FP16 is the spec's single rounding.
    return round_to_half(_mm256_add_ps(lo, hi));
  } else if constexpr (CB == Codebook::k1mad) {
    const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::k1madMul))),
                                       _mm256_set1_epi32(int(trellis::k1madAdd)));
    return _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(byte_sum(x), _mm256_set1_epi32(510))),
                         _mm256_set1_ps(trellis::k1madDivisor));
  } else {
    const __m256i x = _mm256_mullo_epi32(s, _mm256_set1_epi32(int(trellis::kMul1Mul)));
    const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(byte_sum(x), _mm256_set1_epi32(1024))),
                                     _mm256_set1_ps(half_to_float(trellis::kMul1InvBits)),
                                     _mm256_set1_ps(half_to_float(trellis::kMul1BiasBits)));
    return round_to_half(v);
  }
}

METAL_MARLIN_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Tile row i of the GEMV: out[:, 16i : 16i+16]. acc[m][r] holds 8 partial sums of output row r.
template <Codebook CB, int M>
METAL_MARLIN_AVX2 void gemv_tile_row(const MatmulArgs& a, const RowPlan& plan, int64_t i) {
  const int64_t kt = a.k / 16;
  const int words = words_per_tile(a.bits);
  __m256 acc[M][16];
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < 16; ++r) acc[m][r] = _mm256_setzero_ps();
  }
  const uint32_t* tile = a.packed + i * kt * words;
  for (int64_t j = 0; j < kt; ++j, tile += words) {
    const __m256i ring = ring_window(tile, words);
    const float* xj = a.x + 16 * j;
    for (int r = 0; r < 16; ++r) {
      const __m256 left = unit_values<CB>(unit_states(tile, ring, plan, 2 * r));
      const __m256 right = unit_values<CB>(unit_states(tile, ring, plan, 2 * r + 1));
      for (int m = 0; m < M; ++m) {
        const float* xm = xj + m * a.k;
        acc[m][r] = _mm256_fmadd_ps(right, _mm256_loadu_ps(xm + 8),
                                    _mm256_fmadd_ps(left, _mm256_loadu_ps(xm), acc[m][r]));
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < 16; ++r) a.out[m * a.n + 16 * i + r] = horizontal_sum(acc[m][r]);
  }
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r, c < 8.
METAL_MARLIN_AVX2 inline void transpose8(const float* src, int src_stride, float* dst, int dst_stride) {
  __m256 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_load_ps(src + k * src_stride);
  __m256 t[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  __m256 u[8];
  for (int k = 0; k < 2; ++k) {
    u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_store_ps(dst + k * dst_stride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
    _mm256_store_ps(dst + (k + 4) * dst_stride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
  }
}

// out[q, 0:16] (+)= sum_kk x[q, kk] * panel[kk][0:16] for q < MR.
template <int MR>
METAL_MARLIN_AVX2 inline void micro_kernel(const float* x, int64_t ldx, const float* panel, int depth, float* out,
                                           int64_t ldo, bool first) {
  __m256 acc[MR][2];
  for (int q = 0; q < MR; ++q) {
    for (int h = 0; h < 2; ++h) acc[q][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + q * ldo + 8 * h);
  }
  for (int kk = 0; kk < depth; ++kk) {
    const __m256 w0 = _mm256_load_ps(panel + 16 * kk);
    const __m256 w1 = _mm256_load_ps(panel + 16 * kk + 8);
    for (int q = 0; q < MR; ++q) {
      const __m256 xv = _mm256_broadcast_ss(x + q * ldx + kk);
      acc[q][0] = _mm256_fmadd_ps(xv, w0, acc[q][0]);
      acc[q][1] = _mm256_fmadd_ps(xv, w1, acc[q][1]);
    }
  }
  for (int q = 0; q < MR; ++q) {
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + q * ldo + 8 * h, acc[q][h]);
  }
}

// One tile into dst[16 c + r] = Q[r, c]: decoded by row units, then transposed in 8x8 blocks.
template <Codebook CB>
METAL_MARLIN_AVX2 void decode_tile_transposed(const uint32_t* tile, int words, const RowPlan& plan, float* dst) {
  alignas(32) float rows[16 * 16];
  const __m256i ring = ring_window(tile, words);
  for (int u = 0; u < kUnits; ++u) _mm256_store_ps(rows + 8 * u, unit_values<CB>(unit_states(tile, ring, plan, u)));
  for (int rb = 0; rb < 2; ++rb) {
    for (int cb = 0; cb < 2; ++cb) transpose8(rows + 8 * (16 * rb + cb), 16, dst + 8 * (16 * cb + rb), 16);
  }
}

template <Codebook CB>
struct Avx2Kernels {
  using Plan = RowPlan;
  static constexpr int kMicroRows = 6;
  template <int M>
  static constexpr matmul_driver::TileRowFn<RowPlan> gemv = gemv_tile_row<CB, M>;
  static constexpr matmul_driver::DecodeFn<RowPlan> decode_tile = decode_tile_transposed<CB>;
  template <int MR>
  static constexpr matmul_driver::MicroKernelFn multiply = micro_kernel<MR>;
};

}  // namespace

void matmul_avx2(const MatmulArgs& a) {
  matmul_driver::run<Avx2Kernels>(a, matmul_driver::plan_for_bits<RowPlan, build_plan>(a.bits));
}

}  // namespace metal_marlin::cpu::trellis_cpu

#endif  // METAL_MARLIN_X86
