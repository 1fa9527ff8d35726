// The trellis format (docs/formats.md, "Trellis format"), scalar and bit-exact: codebooks (16-bit
// state -> value) and the circular MSB-first bit stream of a 16x16 tile. Header-only and portable;
// the SIMD kernels and the Metal shaders mirror these functions and are tested against them.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "common/dtypes.h"

namespace metal_marlin::trellis {

constexpr int kStateBits = 16;
constexpr uint32_t kNumStates = 1u << kStateBits;
constexpr int kTileSteps = 256;  // 16 x 16 weights, one per step
constexpr int kTileDim = 16;
constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;

// int32 words per tile: 256 * bits stream bits.
constexpr int words_per_tile(int bits) { return 8 * bits; }

enum class Codebook : uint8_t { k3inst, kMcg, k1mad, kMul1 };

inline std::optional<Codebook> parse_codebook(const std::string& name) {
  if (name == "3inst") return Codebook::k3inst;
  if (name == "mcg") return Codebook::kMcg;
  if (name == "1mad") return Codebook::k1mad;
  if (name == "mul1") return Codebook::kMul1;
  return std::nullopt;
}

inline const char* codebook_name(Codebook cb) {
  switch (cb) {
    case Codebook::k3inst: return "3inst";
    case Codebook::kMcg: return "mcg";
    case Codebook::k1mad: return "1mad";
    case Codebook::kMul1: break;
  }
  return "mul1";
}

// Codebook constants (docs/formats.md table).
constexpr uint32_t k3instMul = 89226354u, k3instAdd = 64248484u;
constexpr uint32_t kMcgMul = 0xCBAC1FEDu;
constexpr uint32_t k1madMul = 34038481u, k1madAdd = 76625530u;
constexpr float k1madDivisor = 147.800537109375f;  // exact in float32 (9686256 / 2^16)
constexpr uint32_t kMul1Mul = 0x83DCD12Du;
constexpr uint32_t kHalfMask = 0x8FFF8FFFu, kHalfXor = 0x3B603B60u;
constexpr uint16_t kMul1InvBits = 0x1EEE, kMul1BiasBits = 0xC931;

// The 32-bit word whose two halves are added (3inst, mcg) or whose bytes are summed (1mad, mul1).
inline uint32_t codebook_word(Codebook cb, uint32_t s) {
  switch (cb) {
    case Codebook::k3inst: return s * k3instMul + k3instAdd;
    case Codebook::kMcg: return s * kMcgMul;
    case Codebook::k1mad: return s * k1madMul + k1madAdd;
    case Codebook::kMul1: break;
  }
  return s * kMul1Mul;
}

inline uint32_t byte_sum(uint32_t x) { return (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24); }

// round16(half(lo) + half(hi)) for the masked word. After the mask and xor both halves have exponent
// field 12..15 (|h| in [1/8, 2)), so their float32 sum is exact and one float -> half rounding is the
// spec's single rounding of the exact sum.
inline uint16_t half_sum_bits(uint32_t x) {
  x = (x & kHalfMask) ^ kHalfXor;
  return float_to_half(half_to_float(uint16_t(x & 0xFFFF)) + half_to_float(uint16_t(x >> 16)));
}

// mul1: (1024 + y) * half(0x1EEE) + half(0xC931). Both operands are multiples of 2^-18 below 2^4 in
// magnitude, so product and sum are exact in float32; float_to_half is the single rounding.
inline uint16_t mul1_bits(uint32_t y) {
  const float v = float(1024 + y) * half_to_float(kMul1InvBits) + half_to_float(kMul1BiasBits);
  return float_to_half(v);
}

// The value of state s (0..65535), bit-exact per the spec.
inline float codebook_value(Codebook cb, uint32_t s) {
  const uint32_t x = codebook_word(cb, s);
  switch (cb) {
    case Codebook::k3inst:
    case Codebook::kMcg: return half_to_float(half_sum_bits(x));
    case Codebook::k1mad: return float(int32_t(byte_sum(x)) - 510) / k1madDivisor;
    case Codebook::kMul1: break;
  }
  return half_to_float(mul1_bits(byte_sum(x)));
}

// Stream bit m of a tile (MSB first within each unsigned 32-bit word).
inline uint32_t stream_bit(const uint32_t* words, int64_t m) { return (words[m >> 5] >> (31 - (m & 31))) & 1u; }

// The state of step t: stream bits [(t+1)*bits - 16, (t+1)*bits) modulo 256*bits, read MSB first.
// Loads the (circular) 64 bits around the window and shifts.
inline uint32_t tile_state(const uint32_t* words, int bits, int t) {
  const int n_bits = kTileSteps * bits;
  const int n_words = words_per_tile(bits);
  int start = (t + 1) * bits - kStateBits;
  if (start < 0) start += n_bits;
  const int w = start >> 5;
  const uint64_t window = (uint64_t(words[w]) << 32) | words[(w + 1) % n_words];
  return uint32_t(window >> (64 - kStateBits - (start & 31))) & 0xFFFFu;
}

// Writes the `bits` new bits of step t (the low bits of its state) at stream bits [t*bits, (t+1)*bits).
// `words` must start zeroed.
inline void put_step_bits(uint32_t* words, int bits, int t, uint32_t state) {
  for (int i = 0; i < bits; ++i) {
    const int m = t * bits + i;
    words[m >> 5] |= ((state >> (bits - 1 - i)) & 1u) << (31 - (m & 31));
  }
}

}  // namespace metal_marlin::trellis
