// AVX-512 (F/BW/VL) decode of one 32-code block per format into 2 vectors of 16 float lanes.
// Same contract as decode_avx2.h: lane j of vector i holds code lane_code(i, j) of the block and
//     code_value(u) = lane * kUnit * kVectorUnit[i]
// (powers of two, exact), so kernels permute the activations into lane order once per call.
// Most formats look their values up with vpermps, which indexes a 16-float table by the low 4 bits
// of each lane and ignores the rest: a decoded vector then costs one shuffle instead of a mask and
// a conversion, and a lane may carry other codes above the 4 bits it is indexed by.
#pragma once

#include "common/simd.h"

#if METAL_MARLIN_X86

#include <cstdint>

#include "common/formats.h"

namespace metal_marlin::avx512 {

template <Format F>
struct BlockDecoder;

struct SixteenLanes {
  static constexpr int kVectors = 2;
  static constexpr int kLanes = 16;
};

// int2 and int3 share the 2-bit plane: lane j reads word j % 2 shifted down by 4 * (j / 2), so its
// low 4 bits hold codes c and c + 1 with c = lane_code(0, j); two tables pick one code each.
METAL_MARLIN_AVX512 inline __m512i two_bit_pairs(const uint32_t* words) {
  const __m512i both = _mm512_set1_epi64(static_cast<long long>(uint64_t(words[0]) | (uint64_t(words[1]) << 32)));
  return _mm512_srlv_epi32(both, _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
}

constexpr int two_bit_pair_lane_code(int i, int j) { return 16 * (j & 1) + 2 * (j >> 1) + i; }

// Tables indexed by a pair of 2-bit codes (low code in bits 0-1): the low and the high code.
METAL_MARLIN_AVX512 inline __m512 low_code_table() {
  return _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
}
METAL_MARLIN_AVX512 inline __m512 high_code_table() {
  return _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
}

template <>
struct BlockDecoder<Format::kInt2> : SixteenLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[2] = {1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return two_bit_pair_lane_code(i, j); }

  METAL_MARLIN_AVX512 static void decode(const uint32_t* block, __m512 out[2]) {
    const __m512i pairs = two_bit_pairs(block);
    out[0] = _mm512_permutexvar_ps(pairs, low_code_table());
    out[1] = _mm512_permutexvar_ps(pairs, high_code_table());
  }
};

template <>
struct BlockDecoder<Format::kInt3> : SixteenLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[2] = {1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return two_bit_pair_lane_code(i, j); }

  // The 2-bit plane decodes as for int2; the high bit (word 2, bit c = code c) becomes a lane mask
  // that adds 4. Even lanes 2t hold codes 2t (+1), odd lanes 2t+1 codes 16+2t (+1), so the masks are
  // word 2's even (odd) bits of each half, interleaved.
  METAL_MARLIN_AVX512 static void decode(const uint32_t* block, __m512 out[2]) {
    const uint32_t hi = block[2];
    const __mmask16 mask0 = __mmask16((hi & 0x5555u) | ((hi >> 15) & 0xAAAAu));
    const __mmask16 mask1 = __mmask16(((hi >> 1) & 0x5555u) | ((hi >> 16) & 0xAAAAu));
    const __m512i pairs = two_bit_pairs(block);
    const __m512 four = _mm512_set1_ps(4.0f);
    const __m512 lo0 = _mm512_permutexvar_ps(pairs, low_code_table());
    const __m512 lo1 = _mm512_permutexvar_ps(pairs, high_code_table());
    out[0] = _mm512_mask_add_ps(lo0, mask0, lo0, four);
    out[1] = _mm512_mask_add_ps(lo1, mask1, lo1, four);
  }
};

// int4 and fp4: lane j holds byte j of the block, i.e. codes 2j (low nibble) and 2j + 1.
constexpr int nibble_lane_code(int i, int j) { return 2 * j + i; }

METAL_MARLIN_AVX512 inline __m512i block_bytes(const uint32_t* block) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
}

template <>
struct BlockDecoder<Format::kInt4> : SixteenLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[2] = {1.0f, 0x1p-4f};
  static constexpr int lane_code(int i, int j) { return nibble_lane_code(i, j); }

  // Low nibble by table (shuffle port), high nibble masked in place and converted (lane = 16u, the
  // other port): the two halves of the decode do not queue on the same port.
  METAL_MARLIN_AVX512 static void decode(const uint32_t* block, __m512 out[2]) {
    const __m512i bytes = block_bytes(block);
    const __m512 identity = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    out[0] = _mm512_permutexvar_ps(bytes, identity);
    out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF0)));
  }
};

template <>
struct BlockDecoder<Format::kFp4> : SixteenLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[2] = {1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return nibble_lane_code(i, j); }

  METAL_MARLIN_AVX512 static void decode(const uint32_t* block, __m512 out[2]) {
    const __m512 e2m1 = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,  //
                                       -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
    const __m512i bytes = block_bytes(block);
    out[0] = _mm512_permutexvar_ps(bytes, e2m1);
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), e2m1);
  }
};

template <>
struct BlockDecoder<Format::kInt8> : SixteenLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[2] = {1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return 16 * i + j; }

  METAL_MARLIN_AVX512 static void decode(const uint32_t* block, __m512 out[2]) {
    for (int i = 0; i < 2; ++i) out[i] = _mm512_cvtepi32_ps(block_bytes(block + 4 * i));
  }
};

template <>
struct BlockDecoder<Format::kFp8> : SixteenLanes {
  // As in decode_avx2.h: ((u & 0x7F) << 7) | ((u & 0x80) << 8) is the float16 of E4M3(u) * 2^-8.
  static constexpr float kUnit = 0x1p8f;
  static constexpr float kVectorUnit[2] = {1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return 16 * i + j; }

  METAL_MARLIN_AVX512 static void decode(const uint32_t* block, __m512 out[2]) {
    // Sign extension copies the sign to bits 8-15; after << 7 bit 15 is the sign and bit 14 is masked.
    const __m512i extended = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
    const __m512i halves = _mm512_and_si512(_mm512_slli_epi16(extended, 7), _mm512_set1_epi16(int16_t(0xBF80)));
    out[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
    out[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
  }
};

// The block's weights s * code_value(u) + o, in the decoder's lane order.
template <Format F>
METAL_MARLIN_AVX512 inline void decode_block_weights(const uint32_t* block, float scale, float offset, __m512 out[2]) {
  using Decoder = BlockDecoder<F>;
  Decoder::decode(block, out);
  for (int i = 0; i < 2; ++i) {
    const __m512 lane_scale = _mm512_set1_ps(scale * Decoder::kUnit * Decoder::kVectorUnit[i]);
    if constexpr (FormatTraits<F>::kInteger) {
      out[i] = _mm512_fmadd_ps(out[i], lane_scale, _mm512_set1_ps(offset));
    } else {
      out[i] = _mm512_mul_ps(out[i], lane_scale);
    }
  }
}

}  // namespace metal_marlin::avx512

#endif  // METAL_MARLIN_X86
