// The weight formats of docs/formats.md as compile-time traits plus the scalar decode
// (code -> value). Every CPU kernel is a template over `Format`; host code picks the instantiation
// once with `visit_format`.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

namespace metal_marlin {

enum class Format : uint8_t { kInt2, kInt3, kInt4, kInt8, kFp4, kFp8 };

// Codes are packed in blocks of 32; a block of a `bits`-bit format is exactly `bits` words.
inline constexpr int kBlockCodes = 32;

template <Format F>
struct FormatTraits;

template <>
struct FormatTraits<Format::kInt2> {
  static constexpr const char* kName = "int2";
  static constexpr int kBits = 2;
  static constexpr bool kInteger = true;
};
template <>
struct FormatTraits<Format::kInt3> {
  static constexpr const char* kName = "int3";
  static constexpr int kBits = 3;
  static constexpr bool kInteger = true;
};
template <>
struct FormatTraits<Format::kInt4> {
  static constexpr const char* kName = "int4";
  static constexpr int kBits = 4;
  static constexpr bool kInteger = true;
};
template <>
struct FormatTraits<Format::kInt8> {
  static constexpr const char* kName = "int8";
  static constexpr int kBits = 8;
  static constexpr bool kInteger = true;
};
template <>
struct FormatTraits<Format::kFp4> {
  static constexpr const char* kName = "fp4";
  static constexpr int kBits = 4;
  static constexpr bool kInteger = false;
};
template <>
struct FormatTraits<Format::kFp8> {
  static constexpr const char* kName = "fp8";
  static constexpr int kBits = 8;
  static constexpr bool kInteger = false;
};

// Symmetric integer formats store w = s * (u - mid): the kernels treat that as the asymmetric
// form w = s * u + o with o = -mid * s.
template <Format F>
inline constexpr float kSymmetricMid = FormatTraits<F>::kInteger ? float(1 << (FormatTraits<F>::kBits - 1)) : 0.0f;

// Calls fn(std::integral_constant<Format, F>{}) for the runtime format `format`.
template <class Fn>
decltype(auto) visit_format(Format format, Fn&& fn) {
  switch (format) {
    case Format::kInt2: return fn(std::integral_constant<Format, Format::kInt2>{});
    case Format::kInt3: return fn(std::integral_constant<Format, Format::kInt3>{});
    case Format::kInt4: return fn(std::integral_constant<Format, Format::kInt4>{});
    case Format::kInt8: return fn(std::integral_constant<Format, Format::kInt8>{});
    case Format::kFp4: return fn(std::integral_constant<Format, Format::kFp4>{});
    case Format::kFp8: break;
  }
  return fn(std::integral_constant<Format, Format::kFp8>{});
}

inline const char* format_name(Format format) {
  return visit_format(format, [](auto f) { return FormatTraits<decltype(f)::value>::kName; });
}

inline int format_bits(Format format) {
  return visit_format(format, [](auto f) { return FormatTraits<decltype(f)::value>::kBits; });
}

inline bool format_is_integer(Format format) {
  return visit_format(format, [](auto f) { return FormatTraits<decltype(f)::value>::kInteger; });
}

inline std::optional<Format> parse_format(std::string_view name) {
  for (Format f : {Format::kInt2, Format::kInt3, Format::kInt4, Format::kInt8, Format::kFp4, Format::kFp8}) {
    if (name == format_name(f)) return f;
  }
  return std::nullopt;
}

// Code c (0..31) of the 32-code block that starts at `block` (layouts in docs/formats.md).
template <Format F>
inline uint32_t block_code(const uint32_t* block, int c) {
  constexpr int bits = FormatTraits<F>::kBits;
  if constexpr (bits == 3) {
    const uint32_t lo = (block[c >> 4] >> (2 * (c & 15))) & 3u;  // 2-bit plane, 16 codes per word
    const uint32_t hi = (block[2] >> c) & 1u;                     // 1-bit plane
    return lo | (hi << 2);
  } else {
    constexpr int per_word = 32 / bits;
    return (block[c / per_word] >> (bits * (c % per_word))) & ((1u << bits) - 1u);
  }
}

inline float e2m1_value(uint32_t u) {
  static constexpr float kMagnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float magnitude = kMagnitude[u & 7u];
  return (u & 8u) ? -magnitude : magnitude;
}

inline float e4m3_value(uint32_t u) {
  const int exponent = int((u >> 3) & 15u);
  const int mantissa = int(u & 7u);
  float magnitude;
  if (exponent == 15 && mantissa == 7) {
    magnitude = NAN;
  } else if (exponent == 0) {
    magnitude = std::ldexp(float(mantissa) / 8.0f, -6);
  } else {
    magnitude = std::ldexp(1.0f + float(mantissa) / 8.0f, exponent - 7);
  }
  return (u & 0x80u) ? -magnitude : magnitude;
}

// The value a code stands for before scaling: w = s * code_value(u) (+ o for integer formats).
// Integer formats return the raw code u; fp8 goes through a table because ldexp is slow.
template <Format F>
inline float code_value(uint32_t u) {
  if constexpr (F == Format::kFp4) {
    return e2m1_value(u);
  } else if constexpr (F == Format::kFp8) {
    static const std::array<float, 256> kTable = [] {
      std::array<float, 256> table{};
      for (uint32_t i = 0; i < 256; ++i) table[i] = e4m3_value(i);
      return table;
    }();
    return kTable[u & 0xFFu];
  } else {
    return float(u);
  }
}

}  // namespace metal_marlin
