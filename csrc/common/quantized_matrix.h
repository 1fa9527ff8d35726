// A view of one quantized [N, K] weight (packed codes + float16 scales/offsets, docs/formats.md)
// and its scalar dequantization, the portable definition every SIMD path is checked against.
#pragma once

#include <cstdint>

#include "common/dtypes.h"
#include "common/formats.h"

namespace metal_marlin {

struct QuantizedMatrix {
  Format format;
  int64_t n;           // out features (rows)
  int64_t k;           // in features, a multiple of 32
  int64_t group_size;  // a multiple of 32; the last group of a row is shorter when it does not divide k
  const uint32_t* packed;   // [n, k * bits / 32]
  const uint16_t* scales;   // float16 bits, [n, groups_per_row()]
  const uint16_t* offsets;  // float16 bits, [n, groups_per_row()]; nullptr when symmetric

  int64_t words_per_row() const { return k / kBlockCodes * format_bits(format); }
  int64_t groups_per_row() const { return (k + group_size - 1) / group_size; }
  int64_t blocks_per_row() const { return k / kBlockCodes; }
  int64_t blocks_per_group() const { return group_size / kBlockCodes; }
  const uint32_t* row_words(int64_t row) const { return packed + row * words_per_row(); }
  const uint16_t* row_scales(int64_t row) const { return scales + row * groups_per_row(); }
  const uint16_t* row_offsets(int64_t row) const {
    return offsets ? offsets + row * groups_per_row() : nullptr;
  }
};

// The additive term of w = s * code_value(u) + o for group g of a row: the stored offset, or
// -mid * s for symmetric integer formats, or 0 for the float formats.
template <Format F>
inline float group_offset(const uint16_t* row_offsets, float scale, int64_t g) {
  if (row_offsets) return half_to_float(row_offsets[g]);
  return -kSymmetricMid<F> * scale;
}

// row[k] = W[n, k] for all k, in natural order.
template <Format F>
void dequantize_row_scalar(const QuantizedMatrix& w, int64_t n, float* row) {
  constexpr int bits = FormatTraits<F>::kBits;
  const uint32_t* words = w.row_words(n);
  const uint16_t* scales = w.row_scales(n);
  const uint16_t* offsets = w.row_offsets(n);
  for (int64_t b = 0; b < w.blocks_per_row(); ++b) {
    const int64_t g = b / w.blocks_per_group();
    const float scale = half_to_float(scales[g]);
    const float offset = group_offset<F>(offsets, scale, g);
    const uint32_t* block = words + b * bits;
    float* out = row + b * kBlockCodes;
    for (int c = 0; c < kBlockCodes; ++c) out[c] = scale * code_value<F>(block_code<F>(block, c)) + offset;
  }
}

}  // namespace metal_marlin
