// Activations in a block decoder's lane order (decode_avx2.h, decode_avx512.h): the SIMD kernels
// permute x once per call so the inner loops FMA decoded lanes against contiguous activations.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace metal_marlin::cpu {

// dst (one row of K) = src in Decoder's lane order, block by block, times `unit(i)` per vector.
template <class Decoder, class Unit>
void permute_row(const float* src, int64_t k, Unit unit, float* dst) {
  for (int64_t base = 0; base < k; base += kBlockCodes) {
    for (int i = 0; i < Decoder::kVectors; ++i) {
      for (int j = 0; j < Decoder::kLanes; ++j) {
        dst[base + Decoder::kLanes * i + j] = src[base + Decoder::lane_code(i, j)] * unit(i);
      }
    }
  }
}

struct GemvInputs {
  // [k / 32, m, 32]: block b of every activation row is contiguous, permuted to the decoder's lane
  // order and multiplied by kVectorUnit, so the kernel addresses it with constant offsets.
  AlignedFloats x;
  AlignedFloats group_sums;  // [m, groups]: sum of x over each group (offset term, integer formats)
};

template <Format F, class Decoder>
void prepare_gemv_inputs(const MatmulArgs& args, GemvInputs& in) {
  const int64_t k = args.w.k;
  const int64_t n_groups = args.w.groups_per_row();
  in.x.resize(args.m * k);
  in.group_sums.resize(args.m * n_groups);
  std::vector<float> row(static_cast<size_t>(k));
  std::vector<float> permuted(static_cast<size_t>(k));
  for (int64_t m = 0; m < args.m; ++m) {
    load_activation_row(args, m, row.data());
    permute_row<Decoder>(row.data(), k, [](int i) { return Decoder::kVectorUnit[i]; }, permuted.data());
    for (int64_t b = 0; b < k / kBlockCodes; ++b) {
      std::copy_n(permuted.data() + b * kBlockCodes, kBlockCodes, in.x.data() + (b * args.m + m) * kBlockCodes);
    }
    if constexpr (FormatTraits<F>::kInteger) {
      for (int64_t g = 0; g < n_groups; ++g) {
        float sum = 0.0f;
        const int64_t end = std::min(k, (g + 1) * args.w.group_size);
        for (int64_t i = g * args.w.group_size; i < end; ++i) sum += row[size_t(i)];
        in.group_sums.data()[m * n_groups + g] = sum;
      }
    }
  }
}

}  // namespace metal_marlin::cpu
