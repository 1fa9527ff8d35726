// What the SIMD group-format kernels (kernels_avx2.cpp, kernels_avx512.cpp) share: the choice between
// GEMV and GEMM, the GEMV's threading over rows of W, its loop over groups and blocks, the scale and
// offset bookkeeping per row, and the full dequantize. Each file brings its vector work as a struct:
//
//   struct Isa {
//     template <Format F> using Decoder = ...;       // BlockDecoder of decode_avx2.h / decode_avx512.h
//     static constexpr int kScaleLanes;              // groups per scale vector
//     static constexpr int kBlocksPerStep;           // blocks per GEMV step (one prefetch each)
//     static constexpr int gemv_chains(int m, bool one_block_groups);  // FMA chains per activation row
//     template <Format F, int M, int kChains> struct GemvLanes;  // the GEMV's vector state, see below
//     template <Format F> static void decode_block(block, scale, offset, float* staging);  // weights
//     template <Format F, int M, int kChains> static void gemv_rows(...);  // gemv_rows, flattened
//     template <Format F> static void dequantize_rows(w, out);           // dequantize_rows, flattened
//     template <Format F> static void gemm(args);                        // the file's GEMM
//   };
//
// The vectors live in GemvLanes members and never cross a call: the loops below are only called
// from the Isa's target-attributed, flattened entry points, which inline them into code for one ISA
// (the pattern of trellis_viterbi.cpp).
#pragma once

#include <algorithm>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/lane_order.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu::group_kernels {

constexpr int64_t kGemvMaxRows = 8;          // activation rows one GEMV pass handles
constexpr int64_t kGemvChunkedMaxRows = 16;  // above this, the GEMM path
constexpr int64_t kGemvRowsPerTask = 16;
// The hardware prefetcher alone leaves the GEMV waiting on memory; 2 KiB ahead of the decoder
// (anywhere from 0.5 to 8 KiB measures the same) keeps the stream in L1.
constexpr int kPrefetchBytes = 2048;

// FMA chains per activation row. A group's accumulators restart at zero, so with one-block groups
// out-of-order execution overlaps consecutive groups and one chain can suffice; longer groups (up to
// per-channel) need several to hide the FMA latency, as many as the registers allow.
constexpr int default_gemv_chains(int m) { return m == 1 ? 4 : m <= 4 ? 2 : 1; }

// GemvLanes<F, M, kChains> interface, for M activation rows: clear_offsets(); add_scales(row_scales
// + g, row_offsets + g or nullptr, group_sums + g, n_groups, scales + g) converts kScaleLanes scales
// (times Decoder::kUnit) into `scales` and accumulates the offset terms o_g * (sum of x over group g)
// of the integer formats; offset_sum(m); clear_totals(); clear_chains(); add_block(block, x_block,
// chain_base) decodes one block and accumulates it times x into the chains, starting at chain_base;
// close_group(scale) adds the chains times the group's scale to the totals; total(m).

// out[:, row_begin:row_end] for M activation rows. `scales` holds `groups` floats.
template <class Isa, Format F, int M, int kChains>
void gemv_rows(const MatmulArgs& args, const GemvInputs& in, int64_t row_begin, int64_t row_end, float* scales) {
  using Decoder = typename Isa::template Decoder<F>;
  constexpr int kBits = FormatTraits<F>::kBits;
  constexpr int kStepWords = Isa::kBlocksPerStep * kBits;
  static_assert(Isa::kBlocksPerStep <= 2, "a group's last step starts within the group");
  const QuantizedMatrix& w = args.w;
  const int64_t n_groups = w.groups_per_row();
  const int64_t n_blocks = w.blocks_per_row();
  const int64_t blocks_per_group = w.blocks_per_group();
  const float* group_sums = in.group_sums.data();
  typename Isa::template GemvLanes<F, M, kChains> lanes;

  for (int64_t n = row_begin; n < row_end; ++n) {
    // Row n's scales, and per activation row m the offset term sum_g o_g * (sum of x over group g)
    // of the integer formats (o_g = -mid * s_g if symmetric).
    const uint16_t* row_scales = w.row_scales(n);
    const uint16_t* row_offsets = w.row_offsets(n);
    lanes.clear_offsets();
    int64_t g = 0;
    for (; g + Isa::kScaleLanes <= n_groups; g += Isa::kScaleLanes) {
      lanes.add_scales(row_scales + g, row_offsets ? row_offsets + g : nullptr, group_sums + g, n_groups, scales + g);
    }
    float offset_terms[M];
    for (int m = 0; m < M; ++m) offset_terms[m] = lanes.offset_sum(m);
    for (; g < n_groups; ++g) {
      const float s = half_to_float(row_scales[g]);
      scales[g] = s * Decoder::kUnit;
      if constexpr (FormatTraits<F>::kInteger) {
        const float o = row_offsets ? half_to_float(row_offsets[g]) : -kSymmetricMid<F> * s;
        for (int m = 0; m < M; ++m) offset_terms[m] += o * group_sums[m * n_groups + g];
      }
    }

    lanes.clear_totals();
    const uint32_t* block = w.row_words(n);
    const float* x_block = in.x.data();
    for (g = 0; g < n_groups; ++g) {
      lanes.clear_chains();
      const int64_t group_blocks = std::min(blocks_per_group, n_blocks - g * blocks_per_group);  // last: shorter
      // Every group has a block. Telling the compiler lets it drop the entry test of a loop of
      // one-block steps, and with it goes the decoder's constants' setup out of the group loop.
      if (group_blocks < 1) __builtin_unreachable();
      const uint32_t* group_end = block + group_blocks * kBits;
      // Whole steps. One-block steps run to the group's end exactly, and testing `!=` spares GCC a
      // trip count computation per group (measured: up to 1.5x at M = 1, 32-code groups).
      const uint32_t* last_step_begin = group_end - (kStepWords - kBits);  // not before block: <= 2 blocks
      const auto whole_step_left = [&] {
        return Isa::kBlocksPerStep == 1 ? block != group_end : block < last_step_begin;
      };
      for (; whole_step_left(); block += kStepWords, x_block += Isa::kBlocksPerStep * M * kBlockCodes) {
        _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes, _MM_HINT_T0);
        for (int s = 0; s < Isa::kBlocksPerStep; ++s) {
          lanes.add_block(block + s * kBits, x_block + s * M * kBlockCodes, s * Decoder::kVectors);
        }
      }
      // A partial step. The bound is a constant so that the chain indices are too (the chains stay
      // in registers).
#pragma GCC unroll 4
      for (int s = 0; s < Isa::kBlocksPerStep - 1 && block != group_end; ++s) {
        lanes.add_block(block, x_block, s * Decoder::kVectors);
        block += kBits;
        x_block += M * kBlockCodes;
      }
      lanes.close_group(scales[g]);
    }
    for (int m = 0; m < M; ++m) {
      const float result = lanes.total(m) + offset_terms[m];
      store_outputs(args, m, n, 1, &result);
    }
  }
}

template <class Isa, Format F, int M>
void gemv(const MatmulArgs& args, const GemvInputs& in) {
  const int64_t n_tasks = (args.w.n + kGemvRowsPerTask - 1) / kGemvRowsPerTask;
  const int n_threads = plan_threads(args.n_threads, n_tasks);
  std::vector<AlignedFloats> scratch(size_t(n_threads), AlignedFloats(args.w.groups_per_row()));
  parallel_for(n_threads, n_tasks, [&](int64_t task, int thread) {
    const int64_t begin = task * kGemvRowsPerTask;
    const int64_t end = std::min(args.w.n, begin + kGemvRowsPerTask);
    float* scales = scratch[size_t(thread)].data();
    if (args.w.blocks_per_group() == 1) {
      Isa::template gemv_rows<F, M, Isa::gemv_chains(M, true)>(args, in, begin, end, scales);
    } else {
      Isa::template gemv_rows<F, M, Isa::gemv_chains(M, false)>(args, in, begin, end, scales);
    }
  });
}

template <class Isa, Format F>
void gemv_any_rows(const MatmulArgs& args) {
  GemvInputs in;
  prepare_gemv_inputs<F, typename Isa::template Decoder<F>>(args, in);
  static_assert(kGemvMaxRows == 8, "the cases cover M = 1..8");
  switch (args.m) {
    case 1: return gemv<Isa, F, 1>(args, in);
    case 2: return gemv<Isa, F, 2>(args, in);
    case 3: return gemv<Isa, F, 3>(args, in);
    case 4: return gemv<Isa, F, 4>(args, in);
    case 5: return gemv<Isa, F, 5>(args, in);
    case 6: return gemv<Isa, F, 6>(args, in);
    case 7: return gemv<Isa, F, 7>(args, in);
    default: return gemv<Isa, F, 8>(args, in);
  }
}

// The row-range entry points of gemv.h: x [m, w.k] float32 prepared once, then any range of rows
// into out [m, w.n] float32 (no bias), from any thread.
template <class Isa>
void prepare_float_gemv(const QuantizedMatrix& w, const float* x, int64_t m, GemvInputs& in) {
  const MatmulArgs args{w, x, DType::kFloat32, m, nullptr, nullptr, 1};
  visit_format(w.format, [&](auto f) {
    constexpr Format F = decltype(f)::value;
    prepare_gemv_inputs<F, typename Isa::template Decoder<F>>(args, in);
  });
}

template <class Isa, Format F, int M>
void float_gemv_rows_m(const MatmulArgs& args, const GemvInputs& in, int64_t begin, int64_t end) {
  thread_local AlignedFloats scales;
  scales.reserve_zeroed(args.w.groups_per_row());
  if (args.w.blocks_per_group() == 1) {
    Isa::template gemv_rows<F, M, Isa::gemv_chains(M, true)>(args, in, begin, end, scales.data());
  } else {
    Isa::template gemv_rows<F, M, Isa::gemv_chains(M, false)>(args, in, begin, end, scales.data());
  }
}

template <class Isa>
void float_gemv_rows(const QuantizedMatrix& w, const GemvInputs& in, int64_t m, int64_t begin, int64_t end,
                     float* out) {
  const MatmulArgs args{w, nullptr, DType::kFloat32, m, nullptr, out, 1};
  visit_format(w.format, [&](auto f) {
    constexpr Format F = decltype(f)::value;
    static_assert(kGemvMaxRows == 8, "the cases cover M = 1..8");
    switch (m) {
      case 1: return float_gemv_rows_m<Isa, F, 1>(args, in, begin, end);
      case 2: return float_gemv_rows_m<Isa, F, 2>(args, in, begin, end);
      case 3: return float_gemv_rows_m<Isa, F, 3>(args, in, begin, end);
      case 4: return float_gemv_rows_m<Isa, F, 4>(args, in, begin, end);
      case 5: return float_gemv_rows_m<Isa, F, 5>(args, in, begin, end);
      case 6: return float_gemv_rows_m<Isa, F, 6>(args, in, begin, end);
      case 7: return float_gemv_rows_m<Isa, F, 7>(args, in, begin, end);
      default: return float_gemv_rows_m<Isa, F, 8>(args, in, begin, end);
    }
  });
}

template <class Isa, Format F>
void dequantize_rows(const QuantizedMatrix& w, float* out) {
  using Decoder = typename Isa::template Decoder<F>;
  constexpr int kBits = FormatTraits<F>::kBits;
  const int64_t blocks_per_group = w.blocks_per_group();
  alignas(64) float staging[kBlockCodes];
  for (int64_t n = 0; n < w.n; ++n) {
    const uint32_t* block = w.row_words(n);
    float* row = out + n * w.k;
    for (int64_t b = 0; b < w.blocks_per_row(); ++b, block += kBits) {
      const int64_t g = b / blocks_per_group;
      const float scale = half_to_float(w.row_scales(n)[g]);
      Isa::template decode_block<F>(block, scale, group_offset<F>(w.row_offsets(n), scale, g), staging);
      float* dst = row + b * kBlockCodes;
      for (int i = 0; i < Decoder::kVectors; ++i) {
        for (int j = 0; j < Decoder::kLanes; ++j) dst[Decoder::lane_code(i, j)] = staging[Decoder::kLanes * i + j];
      }
    }
  }
}

template <class Isa>
void quant_matmul(const MatmulArgs& args) {
  visit_format(args.w.format, [&](auto f) {
    constexpr Format F = decltype(f)::value;
    if (args.m > kGemvChunkedMaxRows) return Isa::template gemm<F>(args);
    gemv_in_row_chunks(args, kGemvMaxRows, [](const MatmulArgs& part) { gemv_any_rows<Isa, F>(part); });
  });
}

template <class Isa>
void dequantize(const QuantizedMatrix& w, float* out) {
  visit_format(w.format, [&](auto f) { Isa::template dequantize_rows<decltype(f)::value>(w, out); });
}

}  // namespace metal_marlin::cpu::group_kernels
