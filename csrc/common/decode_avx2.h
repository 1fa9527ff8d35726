// AVX2 decode of one 32-code block per format, shared by the CPU kernels (matmul, MoE, trellis).
//
// A block decodes to 4 vectors of 8 float lanes. To keep the decode down to a shift and a mask or
// a byte shuffle per vector, the lanes are not in code order and not in the code's own units:
// lane j of vector i holds code lane_code(i, j) of the block, and
//     code_value(u) = lane * kUnit * kVectorUnit[i]
// (powers of two, so the rescaling is exact). A kernel permutes the activations into the same
// order once per call (and may fold kVectorUnit into them), so the permutation costs nothing in the
// inner loop. Integer formats decode the raw code u (the zero point is applied as an offset).
#pragma once

#include "common/simd.h"

#if METAL_MARLIN_X86

#include <cstdint>

#include "common/formats.h"

namespace metal_marlin::avx2 {

template <Format F>
struct BlockDecoder;

struct EightLanes {
  static constexpr int kVectors = 4;
  static constexpr int kLanes = 8;
};

// Shared by int2 and int3: the block's two 2-bit-plane words, lane j reading word j % 2 shifted
// down by 8 * (j / 2), so vector i masks bits 2i..2i+1 in place (lane = lo * 4^i).
METAL_MARLIN_AVX2 inline __m256i load_two_bit_plane(const uint32_t* words) {
  const __m256i both = _mm256_set1_epi64x(static_cast<long long>(uint64_t(words[0]) | (uint64_t(words[1]) << 32)));
  return _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 8, 8, 16, 16, 24, 24));
}

constexpr int two_bit_plane_lane_code(int i, int j) { return 16 * (j & 1) + 4 * (j >> 1) + i; }

template <>
struct BlockDecoder<Format::kInt2> : EightLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[4] = {1.0f, 0x1p-2f, 0x1p-4f, 0x1p-6f};
  static constexpr int lane_code(int i, int j) { return two_bit_plane_lane_code(i, j); }

  METAL_MARLIN_AVX2 static void decode(const uint32_t* block, __m256 out[4]) {
    const __m256i plane = load_two_bit_plane(block);
    for (int i = 0; i < 4; ++i) {
      out[i] = _mm256_cvtepi32_ps(_mm256_and_si256(plane, _mm256_set1_epi32(3 << (2 * i))));
    }
  }
};

template <>
struct BlockDecoder<Format::kInt3> : EightLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[4] = {1.0f, 0x1p-2f, 0x1p-4f, 0x1p-6f};
  static constexpr int lane_code(int i, int j) { return two_bit_plane_lane_code(i, j); }

  // The 2-bit plane decodes as for int2 (lo at bit 2i of the lane). The high bit of code c is bit c
  // of word 2; each vector shifts it to bit 2i + 2, right above lo. Lanes 0 and 2 hold codes 0-7,
  // whose bits would need a left shift, so their copy of word 2 is pre-shifted up by 8.
  static constexpr int hi_shift(int i, int j) {
    return lane_code(i, j) + ((j == 0 || j == 2) ? 8 : 0) - (2 * i + 2);
  }

  METAL_MARLIN_AVX2 static void decode(const uint32_t* block, __m256 out[4]) {
    const __m256i lo_plane = load_two_bit_plane(block);
    const __m256i hi_plane =
        _mm256_sllv_epi32(_mm256_set1_epi32(int(block[2])), _mm256_setr_epi32(8, 0, 8, 0, 0, 0, 0, 0));
    for (int i = 0; i < 4; ++i) {
      const __m256i shifts = _mm256_setr_epi32(hi_shift(i, 0), hi_shift(i, 1), hi_shift(i, 2), hi_shift(i, 3),
                                               hi_shift(i, 4), hi_shift(i, 5), hi_shift(i, 6), hi_shift(i, 7));
      const __m256i lo = _mm256_and_si256(lo_plane, _mm256_set1_epi32(3 << (2 * i)));
      const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(hi_plane, shifts), _mm256_set1_epi32(4 << (2 * i)));
      out[i] = _mm256_cvtepi32_ps(_mm256_or_si256(lo, hi));
    }
  }
};

template <>
struct BlockDecoder<Format::kInt4> : EightLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[4] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f};
  // Lanes 0-3 read words 0-3, lanes 4-7 the same words shifted down 16 bits; vector i masks nibble i
  // in place (lane = u * 16^i).
  static constexpr int lane_code(int i, int j) { return 8 * (j & 3) + 4 * (j >> 2) + i; }

  METAL_MARLIN_AVX2 static void decode(const uint32_t* block, __m256 out[4]) {
    const __m256i words = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    const __m256i nibbles = _mm256_srlv_epi32(words, _mm256_setr_epi32(0, 0, 0, 0, 16, 16, 16, 16));
    for (int i = 0; i < 4; ++i) {
      out[i] = _mm256_cvtepi32_ps(_mm256_and_si256(nibbles, _mm256_set1_epi32(0xF << (4 * i))));
    }
  }
};

template <>
struct BlockDecoder<Format::kInt8> : EightLanes {
  static constexpr float kUnit = 1.0f;
  static constexpr float kVectorUnit[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return 8 * i + j; }

  METAL_MARLIN_AVX2 static void decode(const uint32_t* block, __m256 out[4]) {
    for (int i = 0; i < 4; ++i) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 * i));
      out[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    }
  }
};

template <>
struct BlockDecoder<Format::kFp4> : EightLanes {
  // The lane is 2 * E2M1(u) placed in the top byte of an int32.
  static constexpr float kUnit = 0x1p-25f;
  static constexpr float kVectorUnit[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  // The low 128-bit half holds the low nibbles of the block's 16 bytes (even codes), the high half
  // the high nibbles (odd codes); vector i takes bytes 4i..4i+3 of each half.
  static constexpr int lane_code(int i, int j) { return 8 * i + 2 * (j & 3) + (j >> 2); }

  METAL_MARLIN_AVX2 static void decode(const uint32_t* block, __m256 out[4]) {
    // 2 * E2M1(u) for u = 0..15 as signed bytes, once per 128-bit half for the byte shuffle.
    const __m256i doubled_values = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                                    0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m256i words = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(words, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                           _mm256_set1_epi8(0x0F));
    const __m256i values = _mm256_shuffle_epi8(doubled_values, codes);
    for (int i = 0; i < 4; ++i) {
      // Byte 4i + d of each half goes to the top byte of dword d; 0x80 zeroes the other bytes.
      const int b = 4 * i;
      const __m256i place = _mm256_setr_epi32(
          int(0x00808080u | uint32_t(b) << 24), int(0x00808080u | uint32_t(b + 1) << 24),
          int(0x00808080u | uint32_t(b + 2) << 24), int(0x00808080u | uint32_t(b + 3) << 24),
          int(0x00808080u | uint32_t(b) << 24), int(0x00808080u | uint32_t(b + 1) << 24),
          int(0x00808080u | uint32_t(b + 2) << 24), int(0x00808080u | uint32_t(b + 3) << 24));
      out[i] = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(values, place));
    }
  }
};

template <>
struct BlockDecoder<Format::kFp8> : EightLanes {
  // ((u & 0x7F) << 7) | ((u & 0x80) << 8) is the float16 whose value is E4M3(u) * 2^-8, exactly,
  // subnormals included (codes 0x7F/0xFF, NaN in E4M3, come out as +-480).
  static constexpr float kUnit = 0x1p8f;
  static constexpr float kVectorUnit[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  static constexpr int lane_code(int i, int j) { return 8 * i + j; }

  METAL_MARLIN_AVX2 static void decode(const uint32_t* block, __m256 out[4]) {
    for (int half = 0; half < 2; ++half) {
      // Sign-extending the byte puts copies of the sign in bits 8-15; after << 7 bit 15 is the
      // sign and bit 14 (also the sign) is masked away.
      const __m256i extended =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 4 * half)));
      const __m256i halves = _mm256_and_si256(_mm256_slli_epi16(extended, 7), _mm256_set1_epi16(int16_t(0xBF80)));
      out[2 * half] = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
      out[2 * half + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
    }
  }
};

// The block's weights s * code_value(u) + o, in the decoder's lane order.
template <Format F>
METAL_MARLIN_AVX2 inline void decode_block_weights(const uint32_t* block, float scale, float offset, __m256 out[4]) {
  using Decoder = BlockDecoder<F>;
  Decoder::decode(block, out);
  for (int i = 0; i < 4; ++i) {
    const __m256 lane_scale = _mm256_set1_ps(scale * Decoder::kUnit * Decoder::kVectorUnit[i]);
    if constexpr (FormatTraits<F>::kInteger) {
      out[i] = _mm256_fmadd_ps(out[i], lane_scale, _mm256_set1_ps(offset));
    } else {
      out[i] = _mm256_mul_ps(out[i], lane_scale);
    }
  }
}

}  // namespace metal_marlin::avx2

#endif  // METAL_MARLIN_X86
