// Trellis decode for Metal (docs/formats.md, "Trellis format"): codebooks (16-bit state -> value) and
// the circular MSB-first bit stream of a 16x16 tile, bit-exact with csrc/common/trellis.h and the
// reference in metal_marlin/formats/trellis.py.
//
// The unit of work is 8 consecutive steps t0 .. t0+7 (t0 a multiple of 8): 32 lanes x 8 steps decode
// one tile, and lane l's steps 8l .. 8l+7 are row l/2, columns 8(l%2) .. 8(l%2)+7 of the tile. Their
// states are the 16-bit windows ending at stream bits (t0+1)K .. (t0+8)K, i.e. one contiguous run of
// 16 + 7K <= 72 bits: the lane loads the (at most 4) words holding it once, funnel-shifts them so the
// run starts at bit 31 of the first word, and then every state is a shift/mask by a compile-time
// amount (K is a template parameter).
#pragma once

#include <metal_stdlib>
using namespace metal;

// Scalar parameters of trellis_gemv / trellis_gemm (trellis.metal); 32-bit fields only.
struct TrellisMatmulParams {
  uint m;  // rows of xs and z
  uint n;  // output features (a multiple of 16)
  uint k;  // input features (a multiple of 16)
};

// Host names spell these 3inst, 1mad, mcg, mul1 (the checkpoint's `codebook` setting).
enum TrellisCodebook : uint {
  kTrellis3inst = 0,
  kTrellis1mad = 1,
  kTrellisMcg = 2,
  kTrellisMul1 = 3,
};

constant constexpr uint kTrellisStateBits = 16;
constant constexpr uint kTrellisTileSteps = 256;

// 3inst / mcg: keep sign + 12 low bits of each half, xor in an exponent (|h| in [1/8, 2)), add the two
// halves. Their float32 sum is exact, so the conversion to half is the spec's single rounding.
inline float trellis_half_pair_sum(uint x) {
  const half2 h = as_type<half2>((x & 0x8FFF8FFFu) ^ 0x3B603B60u);
  return float(half(float(h.x) + float(h.y)));
}

inline uint trellis_byte_sum(uint x) {
  return (x & 0xFFu) + ((x >> 8) & 0xFFu) + ((x >> 16) & 0xFFu) + (x >> 24);
}

// 1mad: (y - 510) / 147.800537109375 rounded to float32. Metal's fast-math division is not correctly
// rounded, so divide by a reciprocal multiply plus one fma correction step; this is the correctly
// rounded quotient for every y in 0..1020 (checked exhaustively on the CPU; the decode test of
// tests/metal/test_msl_trellis.py covers every state).
constant constexpr float kTrellis1madDivisor = 147.800537109375f;
constant constexpr float kTrellis1madReciprocal = 1.0f / 147.800537109375f;

inline float trellis_1mad_value(uint y) {
  const float n = float(int(y) - 510);
  const float q = n * kTrellis1madReciprocal;
  return fma(fma(-q, kTrellis1madDivisor, n), kTrellis1madReciprocal, q);
}

// mul1: (1024 + y) * half(0x1EEE) + half(0xC931). half(0x1EEE) = 1774 * 2^-18 and half(0xC931) =
// -10.3828125; product and sum are exact in float32 (fused or not), the conversion is the one rounding.
constant constexpr float kTrellisMul1Scale = 1774.0f / 262144.0f;
constant constexpr float kTrellisMul1Bias = -10.3828125f;

inline float trellis_mul1_value(uint y) {
  return float(half(float(1024u + y) * kTrellisMul1Scale + kTrellisMul1Bias));
}

// The value of state s (0..65535). CB is a compile-time constant, so only one branch survives.
template <TrellisCodebook CB>
inline float trellis_value(uint s) {
  if (CB == kTrellis3inst) {
    return trellis_half_pair_sum(s * 89226354u + 64248484u);
  }
  if (CB == kTrellisMcg) {
    return trellis_half_pair_sum(s * 0xCBAC1FEDu);
  }
  if (CB == kTrellis1mad) {
    return trellis_1mad_value(trellis_byte_sum(s * 34038481u + 76625530u));
  }
  return trellis_mul1_value(trellis_byte_sum(s * 0x83DCD12Du));
}

// 16 bits starting at bit p (0 = the MSB of a[0]) of an aligned run; p is a compile-time constant
// once the caller's loop is unrolled, so the branch and the shifts fold away.
inline uint trellis_bits16(thread const uint* a, uint p) {
  const uint i = p / 32;
  const uint r = p % 32;
  if (r <= 16) {
    return (a[i] >> (16 - r)) & 0xFFFFu;
  }
  return ((a[i] << (r - 16)) | (a[i + 1] >> (48 - r))) & 0xFFFFu;
}

// Values of steps t0 .. t0+7 (t0 a multiple of 8) of the tile whose 8K words start at `words`.
template <TrellisCodebook CB, uint K>
inline void trellis_decode8(const device uint* words, uint t0, thread float* values) {
  constexpr uint kWords = 8 * K;
  constexpr uint kStreamBits = kTrellisTileSteps * K;
  constexpr uint kRunBits = kTrellisStateBits + 7 * K;
  constexpr uint kAligned = (kRunBits + 31) / 32;  // words of the aligned run (1..3)
  // Window of step t0: bits [(t0+1)K - 16, (t0+1)K), wrapping to the end of the ring for t0 = 0.
  const int begin = int((t0 + 1) * K) - int(kTrellisStateBits);
  const uint start = begin < 0 ? uint(begin + int(kStreamBits)) : uint(begin);
  const uint first = start / 32;
  const uint offset = start % 32;
  uint raw[kAligned + 1];
#pragma clang loop unroll(full)
  for (uint i = 0; i <= kAligned; ++i) {
    const uint w = first + i;
    raw[i] = words[w < kWords ? w : w - kWords];
  }
  // Funnel shift left by `offset` (0..31) without a shift by 32: (next >> 1) >> (31 - offset).
  uint run[kAligned];
#pragma clang loop unroll(full)
  for (uint i = 0; i < kAligned; ++i) {
    run[i] = (raw[i] << offset) | ((raw[i + 1] >> 1) >> (31 - offset));
  }
#pragma clang loop unroll(full)
  for (uint k = 0; k < 8; ++k) {
    values[k] = trellis_value<CB>(trellis_bits16(run, k * K));
  }
}
