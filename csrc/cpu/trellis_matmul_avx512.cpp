// AVX-512 trellis matmul (AVX-512 BW/VBMI/VBMI2/FP16, Sapphire Rapids class).
//
// Decode works on columns, 32 states per vector in 16-bit lanes: lane l of column pair q holds the
// state of tile row l % 16, column 2q + l / 16. Per vector:
//   states: the tile sits in two (K <= 4) or four 64-byte registers; two byte permutes (vpermi2b)
//     bring each lane the two 16-bit words of stream bits [8B, 8B + 32) around its window (B = start
//     bit / 8) and a 16-bit funnel shift (vpshldvw) by start bit % 8 extracts the state;
//   codebook: x = s * mul + add (mod 2^32) as two 16-bit halves (vpmullw / vpmulhuw and the carry of
//     the low half), then 3inst/mcg: mask, xor, one FP16 add of the halves (AVX512-FP16 rounds once,
//     as the spec does); 1mad/mul1: byte sums with vpmaddubsw, then FP16 convert / fma (exact, one
//     rounding) and float32 division for 1mad;
//   two vcvtph2ps give the two columns as float32 vectors of the tile's 16 output rows.
// So a column is already a vector over output rows: the GEMV multiplies it by a broadcast x[m, col]
// into one accumulator per activation row (no reduction at the end), and the GEMM stores it as one
// row of its [K, 16] panel (no transpose).
#include "cpu/trellis_kernels.h"

#if METAL_MARLIN_X86

#include <algorithm>

#include "cpu/trellis_matmul_driver.h"

namespace metal_marlin::cpu::trellis_cpu {
namespace {

using metal_marlin::trellis::words_per_tile;

constexpr int kColumnPairs = 8;

// The byte permutes and shifts that decode each column pair of a tile with `bits` bits per step.
struct ColumnPlan {
  alignas(64) uint8_t high_word[kColumnPairs][64];  // tile bytes of stream bytes B + 1, B (lane low, high byte)
  alignas(64) uint8_t low_word[kColumnPairs][64];   // tile bytes of stream bytes B + 3, B + 2
  alignas(64) uint16_t shift[kColumnPairs][32];     // start bit % 8
  __mmask64 high_word_upper[kColumnPairs];          // K >= 5: bytes from the tile's second 128 bytes
  __mmask64 low_word_upper[kColumnPairs];
  __mmask16 load_mask[4];                           // tile words in each 64-byte register
};

void build_plan(int bits, ColumnPlan& plan) {
  const int ring_bytes = 4 * words_per_tile(bits);
  const auto tile_byte = [&](int stream_byte) { return uint8_t(memory_byte(stream_byte % ring_bytes)); };
  for (int q = 0; q < kColumnPairs; ++q) {
    plan.high_word_upper[q] = plan.low_word_upper[q] = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const int start = window_start(bits, 16 * (lane % 16) + 2 * q + lane / 16);
      const int b = start / 8;
      const uint8_t bytes[4] = {tile_byte(b + 1), tile_byte(b), tile_byte(b + 3), tile_byte(b + 2)};
      plan.high_word[q][2 * lane] = bytes[0];
      plan.high_word[q][2 * lane + 1] = bytes[1];
      plan.low_word[q][2 * lane] = bytes[2];
      plan.low_word[q][2 * lane + 1] = bytes[3];
      for (int i = 0; i < 2; ++i) {
        plan.high_word_upper[q] |= __mmask64(bytes[i] >> 7) << (2 * lane + i);
        plan.low_word_upper[q] |= __mmask64(bytes[2 + i] >> 7) << (2 * lane + i);
      }
      plan.shift[q][lane] = uint16_t(start % 8);
    }
  }
  for (int r = 0; r < 4; ++r) {
    const int words = std::clamp(words_per_tile(bits) - 16 * r, 0, 16);
    plan.load_mask[r] = __mmask16((1u << words) - 1);
  }
}

// R = 2 registers hold a tile of up to 128 bytes (K <= 4), R = 4 up to 256.
template <int R>
METAL_MARLIN_AVX512_TRELLIS inline void load_tile(const uint32_t* words, const ColumnPlan& plan, __m512i (&tile)[R]) {
  for (int r = 0; r < R; ++r) tile[r] = _mm512_maskz_loadu_epi32(plan.load_mask[r], words + 16 * r);
}

template <int R>
METAL_MARLIN_AVX512_TRELLIS inline __m512i pick_bytes(const __m512i (&tile)[R], const uint8_t* index,
                                                      __mmask64 upper) {
  const __m512i idx = _mm512_load_si512(index);
  if constexpr (R == 2) {
    return _mm512_permutex2var_epi8(tile[0], idx, tile[1]);
  } else {
    return _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(tile[0], idx, tile[1]),
                                  _mm512_permutex2var_epi8(tile[2], idx, tile[3]));
  }
}

template <int R>
METAL_MARLIN_AVX512_TRELLIS inline __m512i column_states(const __m512i (&tile)[R], const ColumnPlan& plan, int q) {
  const __m512i high = pick_bytes<R>(tile, plan.high_word[q], plan.high_word_upper[q]);
  const __m512i low = pick_bytes<R>(tile, plan.low_word[q], plan.low_word_upper[q]);
  return _mm512_shldv_epi16(high, low, _mm512_load_si512(plan.shift[q]));
}

// x = s * Mul + Add (mod 2^32) as its low and high 16-bit halves.
template <uint32_t Mul, uint32_t Add>
METAL_MARLIN_AVX512_TRELLIS inline void codebook_word(__m512i s, __m512i& lo, __m512i& hi) {
  const __m512i mul_lo = _mm512_set1_epi16(short(Mul & 0xFFFF));
  lo = _mm512_mullo_epi16(s, mul_lo);
  hi = _mm512_add_epi16(_mm512_mulhi_epu16(s, mul_lo), _mm512_mullo_epi16(s, _mm512_set1_epi16(short(Mul >> 16))));
  if constexpr (Add != 0) {
    const __m512i add_lo = _mm512_set1_epi16(short(Add & 0xFFFF));
    lo = _mm512_add_epi16(lo, add_lo);
    hi = _mm512_add_epi16(hi, _mm512_set1_epi16(short(Add >> 16)));
    hi = _mm512_mask_add_epi16(hi, _mm512_cmplt_epu16_mask(lo, add_lo), hi, _mm512_set1_epi16(1));  // carry
  }
}

// Sum of the four bytes of x (given as its 16-bit halves), in 16-bit lanes.
METAL_MARLIN_AVX512_TRELLIS inline __m512i byte_sum(__m512i lo, __m512i hi) {
  const __m512i ones = _mm512_set1_epi8(1);
  return _mm512_add_epi16(_mm512_maddubs_epi16(lo, ones), _mm512_maddubs_epi16(hi, ones));
}

METAL_MARLIN_AVX512_TRELLIS inline __m512h half_constant(uint16_t bits) {
  return _mm512_castsi512_ph(_mm512_set1_epi16(short(bits)));
}

// Values of the 32 states of a column pair: `first` = column 2q, `second` = column 2q + 1.
template <Codebook CB>
METAL_MARLIN_AVX512_TRELLIS inline void column_values(__m512i s, __m512& first, __m512& second) {
  __m512i lo, hi;
  __m512h h;
  if constexpr (CB == Codebook::k3inst || CB == Codebook::kMcg) {
    static_assert((trellis::kHalfMask >> 16) == (trellis::kHalfMask & 0xFFFF) &&
                      (trellis::kHalfXor >> 16) == (trellis::kHalfXor & 0xFFFF),
                  "one 16-bit mask and xor serve both halves");
    if constexpr (CB == Codebook::k3inst) {
      codebook_word<trellis::k3instMul, trellis::k3instAdd>(s, lo, hi);
    } else {
      codebook_word<trellis::kMcgMul, 0>(s, lo, hi);
    }
    const __m512i mask = _mm512_set1_epi16(short(trellis::kHalfMask & 0xFFFF));
    const __m512i flip = _mm512_set1_epi16(short(trellis::kHalfXor & 0xFFFF));
    h = _mm512_add_ph(_mm512_castsi512_ph(_mm512_ternarylogic_epi32(lo, mask, flip, 0x6a)),  // (a & b) ^ c
                      _mm512_castsi512_ph(_mm512_ternarylogic_epi32(hi, mask, flip, 0x6a)));
  } else if constexpr (CB == Codebook::k1mad) {
    codebook_word<trellis::k1madMul, trellis::k1madAdd>(s, lo, hi);
    h = _mm512_cvtepi16_ph(_mm512_sub_epi16(byte_sum(lo, hi), _mm512_set1_epi16(510)));  // |y - 510| <= 510: exact
  } else {
    codebook_word<trellis::kMul1Mul, 0>(s, lo, hi);
    // 1024 + y <= 2044 is exact in FP16 and the FP16 fma rounds once, as the spec.
    h = _mm512_fmadd_ph(_mm512_cvtepi16_ph(_mm512_add_epi16(byte_sum(lo, hi), _mm512_set1_epi16(1024))),
                        half_constant(trellis::kMul1InvBits), half_constant(trellis::kMul1BiasBits));
  }
  const __m512i bits = _mm512_castph_si512(h);
  first = _mm512_cvtph_ps(_mm512_castsi512_si256(bits));
  second = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(bits, 1));
  if constexpr (CB == Codebook::k1mad) {
    first = _mm512_div_ps(first, _mm512_set1_ps(trellis::k1madDivisor));
    second = _mm512_div_ps(second, _mm512_set1_ps(trellis::k1madDivisor));
  }
}

// Tile row i of the GEMV: out[:, 16i : 16i+16] += the tile row times x, one accumulator per row of x
// (two chains for few rows, to cover the FMA latency).
template <Codebook CB, int R, int M>
METAL_MARLIN_AVX512_TRELLIS void gemv_tile_row(const MatmulArgs& a, const ColumnPlan& plan, int64_t i) {
  constexpr int kChains = M <= 4 ? 2 : 1;
  const int64_t kt = a.k / 16;
  const int words = words_per_tile(a.bits);
  __m512 acc[M][kChains];
  for (int m = 0; m < M; ++m) {
    for (int c = 0; c < kChains; ++c) acc[m][c] = _mm512_setzero_ps();
  }
  const uint32_t* tile = a.packed + i * kt * words;
  for (int64_t j = 0; j < kt; ++j, tile += words) {
    __m512i regs[R];
    load_tile<R>(tile, plan, regs);
    const float* xj = a.x + 16 * j;
#pragma GCC unroll 8
    for (int q = 0; q < kColumnPairs; ++q) {
      __m512 v[2];
      column_values<CB>(column_states<R>(regs, plan, q), v[0], v[1]);
      for (int h = 0; h < 2; ++h) {
        for (int m = 0; m < M; ++m) {
          acc[m][h % kChains] = _mm512_fmadd_ps(v[h], _mm512_set1_ps(xj[m * a.k + 2 * q + h]), acc[m][h % kChains]);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[m][0];
    for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[m][c]);
    _mm512_storeu_ps(a.out + m * a.n + 16 * i, sum);
  }
}

// out[q, :] (+)= sum_kk x[q, kk] * panel[kk][:] for the 16 outputs of the panel, q < MR.
template <int MR>
METAL_MARLIN_AVX512_TRELLIS inline void micro_kernel(const float* x, int64_t ldx, const float* panel, int depth,
                                                     float* out, int64_t ldo, bool first) {
  __m512 acc[MR];
  for (int q = 0; q < MR; ++q) acc[q] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + q * ldo);
  for (int kk = 0; kk < depth; ++kk) {
    const __m512 w = _mm512_load_ps(panel + 16 * kk);
    for (int q = 0; q < MR; ++q) acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(x[q * ldx + kk]), w, acc[q]);
  }
  for (int q = 0; q < MR; ++q) _mm512_storeu_ps(out + q * ldo, acc[q]);
}

// One tile into dst[16 c + r] = Q[r, c]: each decoded column is a row of the panel (no transpose).
template <Codebook CB, int R>
METAL_MARLIN_AVX512_TRELLIS void decode_tile_columns(const uint32_t* tile, int words, const ColumnPlan& plan,
                                                     float* dst) {
  __m512i regs[R];
  load_tile<R>(tile, plan, regs);
#pragma GCC unroll 8
  for (int q = 0; q < kColumnPairs; ++q) {
    __m512 first, second;
    column_values<CB>(column_states<R>(regs, plan, q), first, second);
    _mm512_store_ps(dst + 16 * (2 * q), first);
    _mm512_store_ps(dst + 16 * (2 * q + 1), second);
  }
}

// R = 2 registers per tile for K <= 4, 4 above.
template <int R>
struct Avx512Kernels {
  template <Codebook CB>
  struct ForCodebook {
    using Plan = ColumnPlan;
    static constexpr int kMicroRows = 8;
    template <int M>
    static constexpr matmul_driver::TileRowFn<ColumnPlan> gemv = gemv_tile_row<CB, R, M>;
    static constexpr matmul_driver::DecodeFn<ColumnPlan> decode_tile = decode_tile_columns<CB, R>;
    template <int MR>
    static constexpr matmul_driver::MicroKernelFn multiply = micro_kernel<MR>;
  };
};

}  // namespace

void matmul_avx512(const MatmulArgs& a) {
  const ColumnPlan& plan = matmul_driver::plan_for_bits<ColumnPlan, build_plan>(a.bits);
  if (a.bits <= 4) {
    matmul_driver::run<Avx512Kernels<2>::ForCodebook>(a, plan);
  } else {
    matmul_driver::run<Avx512Kernels<4>::ForCodebook>(a, plan);
  }
}

}  // namespace metal_marlin::cpu::trellis_cpu

#endif  // METAL_MARLIN_X86
