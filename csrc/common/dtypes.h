// Scalar conversions between float32 and the 16-bit float types the kernels read and write
// (float16 scales/offsets/activations, bfloat16 activations). Portable, bit-exact, round to nearest
// even; used by every CPU kernel so all paths agree on rounding.
#pragma once

#include <cstdint>
#include <cstring>

namespace metal_marlin {

enum class DType : uint8_t { kFloat32, kFloat16, kBFloat16 };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float32.
    const float magnitude = float(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  if (u >= 0x47800000u) {  // >= 65536, inf or nan: no rounding can bring these into range
    return uint16_t(sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u));
  }
  if (u < 0x38800000u) {
    // Result is subnormal or zero: adding 0.5 aligns the 10 kept bits at the bottom of the
    // mantissa, and the FPU's own round-to-nearest-even does the rounding.
    const float aligned = bits_float(u) + 0.5f;
    return uint16_t(sign | (float_bits(aligned) - 0x3F000000u));
  }
  const uint32_t mantissa_odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + mantissa_odd;  // rebias exponent 127 -> 15 and round to nearest even
  return uint16_t(sign | (u >> 13));
}

inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);  // keep nan quiet
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// dst[i] = float(src[i]) for `count` elements of type `dtype`.
inline void convert_to_float(const void* src, DType dtype, int64_t count, float* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, size_t(count) * sizeof(float));
  } else if (dtype == DType::kFloat16) {
    const auto* h = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float(h[i]);
  } else {
    const auto* b = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(b[i]);
  }
}

// dst[i] = dtype(src[i]) for `count` elements.
inline void convert_from_float(const float* src, int64_t count, DType dtype, void* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, src, size_t(count) * sizeof(float));
  } else if (dtype == DType::kFloat16) {
    auto* h = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < count; ++i) h[i] = float_to_half(src[i]);
  } else {
    auto* b = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < count; ++i) b[i] = float_to_bf16(src[i]);
  }
}

}  // namespace metal_marlin
