// quant_decode.h: the shared decode header of the group-quantized formats (docs/formats.md).
//
// Every group format stores a 32-code packing block of row n in exactly BITS consecutive uint32 words
// (32 codes * BITS bits = BITS words): block b of a row starts at word b * BITS of that row. A block
// lies inside one group (group sizes are multiples of 32), so one GroupScale serves all its codes.
// Kernels work on chunks of 8 consecutive codes (chunk j = codes 8j .. 8j+7 of a block, j = 0..3).
//
// API (everything is a template over a format trait F, so kernels stay format-generic):
//   Format traits   IntFormat<BITS, ASYMMETRIC> (BITS = 2, 3, 4, 8), Fp4Format (E2M1), Fp8Format (E4M3 fn)
//                   F::BITS        bits per code = words per 32-code block
//                   F::ASYMMETRIC  1 if the format reads offsets (w = s*u + o), else 0
//                   F::value(u)    the code's value before scaling, exact in float: u for the integer
//                                  formats, E2M1(u), E4M3(u)
//                   F::implicit_offset(s)  the offset of a group without stored offset: -s*2^(BITS-1)
//                                  for symmetric integers (their grid s*(u - 2^(BITS-1))), 0 for fp
//   load_block<BITS>(words, out)              the BITS words of one block into registers (16-byte
//                                            vector loads for 8/4 bits, 8-byte for 2 bits)
//   chunk_codes<BITS>(block, j, u)           the 8 unsigned codes of chunk j of a block; `block` is a
//                                            pointer in any address space (device, threadgroup, thread)
//   group_scale<F>(scales, offsets, index)   GroupScale {scale, offset} of one group (`offsets` is
//                                            read only when F::ASYMMETRIC)
//   dequant_chunk<F>(block, j, gs, w)        w[i] = fma(scale, F::value(u_i), offset), i = 0..7
//
// Exactness: scale * value is exact in float for every format (an 11-bit fp16 significand times at
// most 8 significant bits), and so is the implicit offset (a power-of-two multiple of the scale), so
// dequant_chunk rounds once, like the reference `codes * scales + offsets` (or `values * scales`) in
// float32: the dequantized weights are bit-identical to the reference.

#pragma once

#include <metal_stdlib>
using namespace metal;

// -- format traits -------------------------------------------------------------------------------

template <uint B, bool A>
struct IntFormat {
  enum : uint { BITS = B, ASYMMETRIC = A ? 1u : 0u };
  static float value(uint u) { return float(u); }
  // Folding the symmetric centre 2^(B-1) into the offset saves a subtraction per weight.
  static float implicit_offset(float scale) { return -scale * float(1u << (B - 1)); }
};

// E2M1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0. Normals are built as float bit
// patterns (exponent rebiased to 127) and the e = 0 subnormals as m * 0.5, so no float denormal
// (which Apple GPUs may flush) ever appears.
struct Fp4Format {
  enum : uint { BITS = 4, ASYMMETRIC = 0 };
  static float value(uint u) {
    const uint e = (u >> 1) & 3u, m = u & 1u;
    const float magnitude = e == 0 ? float(m) * 0.5f : as_type<float>(((e + 126u) << 23) | (m << 22));
    return (u & 8u) ? -magnitude : magnitude;
  }
  static float implicit_offset(float) { return 0.0f; }
};

// E4M3 "fn": sign bit 7, exponent bits 6-3 (bias 7), mantissa bits 2-0; e = 0 is m/8 * 2^-6. The NaN
// codes 0x7F/0xFF decode to 480 (never produced by the quantizer; docs/formats.md allows it).
struct Fp8Format {
  enum : uint { BITS = 8, ASYMMETRIC = 0 };
  static float value(uint u) {
    const uint e = (u >> 3) & 15u, m = u & 7u;
    const float magnitude = e == 0 ? float(m) * (1.0f / 512.0f) : as_type<float>(((e + 120u) << 23) | (m << 20));
    return (u & 0x80u) ? -magnitude : magnitude;
  }
  static float implicit_offset(float) { return 0.0f; }
};

// -- code extraction -----------------------------------------------------------------------------

// Loads the BITS words of one 32-code block. `words` must be 16-byte aligned for 4 and 8 bits and
// 8-byte aligned for 2 bits, which holds for every block of a packed [(E,) N, K*BITS/32] tensor in a
// 16-byte aligned buffer (K is a multiple of 32, so a row is a whole number of blocks).
template <uint BITS>
inline void load_block(const device uint* words, thread uint* out) {
  if (BITS == 8) {
    const uint4 a = reinterpret_cast<const device uint4*>(words)[0];
    const uint4 b = reinterpret_cast<const device uint4*>(words)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else if (BITS == 4) {
    const uint4 a = reinterpret_cast<const device uint4*>(words)[0];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  } else if (BITS == 2) {
    const uint2 a = reinterpret_cast<const device uint2*>(words)[0];
    out[0] = a.x; out[1] = a.y;
  } else {
    // 3 bits: a block is 12 bytes, so only 4-byte alignment is guaranteed.
    out[0] = words[0]; out[1] = words[1]; out[2] = words[2];
  }
}

// The codes 8j .. 8j+7 of a block (j = 0..3) as unsigned integers. Chunk j occupies: 8 bits - words
// 2j and 2j+1; 4 bits - word j; 2 bits - the (j&1) half of word j/2; 3 bits - the (j&1) half of the
// low-plane word j/2 and byte j of the high-plane word 2.
template <uint BITS, typename WordPtr>
inline void chunk_codes(WordPtr block, uint j, thread uint* u) {
  if (BITS == 8) {
    const uint lo = block[2 * j], hi = block[2 * j + 1];
    for (uint i = 0; i < 4; ++i) {
      u[i] = (lo >> (8 * i)) & 0xFFu;
      u[i + 4] = (hi >> (8 * i)) & 0xFFu;
    }
  } else if (BITS == 4) {
    const uint w = block[j];
    for (uint i = 0; i < 8; ++i) u[i] = (w >> (4 * i)) & 0xFu;
  } else if (BITS == 2) {
    const uint w = block[j >> 1] >> (16 * (j & 1));
    for (uint i = 0; i < 8; ++i) u[i] = (w >> (2 * i)) & 3u;
  } else {
    const uint lo = block[j >> 1] >> (16 * (j & 1));
    const uint hi = block[2] >> (8 * j);
    for (uint i = 0; i < 8; ++i) u[i] = ((lo >> (2 * i)) & 3u) | (((hi >> i) & 1u) << 2);
  }
}

// -- dequantization ------------------------------------------------------------------------------

struct GroupScale {
  float scale;
  float offset;
};

template <typename F, typename HalfPtr>
inline GroupScale group_scale(HalfPtr scales, HalfPtr offsets, uint index) {
  GroupScale gs;
  gs.scale = float(scales[index]);
  gs.offset = F::ASYMMETRIC ? float(offsets[index]) : F::implicit_offset(gs.scale);
  return gs;
}

template <typename F, typename WordPtr>
inline void dequant_chunk(WordPtr block, uint j, GroupScale gs, thread float* w) {
  uint u[8];
  chunk_codes<F::BITS>(block, j, u);
  for (uint i = 0; i < 8; ++i) w[i] = fma(gs.scale, F::value(u[i]), gs.offset);
}
