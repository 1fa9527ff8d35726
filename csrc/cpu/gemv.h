// The decode-time matrix-vector product over a range of W's rows, for activations prepared once.
// quant_matmul's integer GEMV and the fused decoder step (decoder_step.cpp) use it: the step runs
// several matrices over one input (q/k/v, gate/up) and splits their rows over its threads, so the
// activations are converted once per input and every thread reads the same prepared copy.
//
// Paths (current_simd_level()):
//   avx512_amx / avx512_vnni, int4/int8 weights: integer dot products (vpdpbusd) of the weight codes with the
//     activations as 16-bit fixed point per 32-block (gemv_vnni.cpp; docs/kernels.md gives the bound);
//   avx512 / avx2 (and the other formats): the float GEMV of group_gemv.h, exact float32 products;
//   scalar: the portable dequantize-and-dot.
#pragma once

#include <cstdint>

#include "common/quantized_matrix.h"
#include "cpu/kernels.h"
#include "cpu/lane_order.h"

namespace metal_marlin::cpu {

// Activations split for the integer GEMV: per 32-block b, d_b = max|x_b| / kVnniRange and
// t = round(x / d_b) in [-kVnniRange, kVnniRange] = 256 * high + low with high, low int8.
inline constexpr int kVnniRange = 32639;  // (32639 + 128) >> 8 = 127: high stays an int8

struct VnniActivations {
  int64_t chunks = 0;             // 64-byte weight chunks per row of W (the last one may be partial)
  int64_t chunk_bytes = 0;        // bytes of x per chunk and row: 4 x 64 (int4) or 2 x 64 (int8)
  AlignedBuffer<int8_t> bytes;    // [m, chunks, chunk_bytes]: high and low bytes in the weights' byte order
  AlignedFloats block_scales;     // [m, chunks, 16]: d_b of the block each int32 lane of a chunk sums
  AlignedFloats group_sums;       // [m, groups]: sum of the float x over each group (offset terms)
};

struct GemvActivations {
  // What they were prepared for.
  Format format = Format::kInt4;
  int64_t k = 0, group_size = 0, m = 0;
  SimdLevel level = SimdLevel::kScalar;
  bool vnni = false;
  VnniActivations ints;  // the integer path
  GemvInputs floats;     // the float paths: lane-permuted x and group sums (lane_order.h)
  AlignedFloats plain;   // the scalar path: x as given
};

// True when the integer path serves `format` at `level`.
bool gemv_uses_vnni(SimdLevel level, Format format);
// Whether `a` holds activations prepared for w's format, group size and K on the path in effect.
bool gemv_prepared_for(const GemvActivations& a, const QuantizedMatrix& w);
// Prepares x [m, w.k] float32 (1 <= m <= kGemvMaxRows) for w's format, group size and K.
void prepare_gemv(const QuantizedMatrix& w, const float* x, int64_t m, GemvActivations& a);
// out[i * w.n + r] = sum_k x[i, k] W[r, k] for activation rows i < a.m and rows r in [row_begin, row_end)
// (no bias). Uses thread-local scratch: call from any thread, concurrently on disjoint row ranges.
void gemv_rows(const QuantizedMatrix& w, const GemvActivations& a, int64_t row_begin, int64_t row_end, float* out);

// quant_matmul on the integer path for int4/int8 (dispatch.cpp routes it here): the GEMV for m <= 16,
// the GEMM of gemm_vnni.cpp above, with the same activation rounding.
void quant_matmul_vnni_gemv(const MatmulArgs& args);
void quant_matmul_vnni_gemm(const MatmulArgs& args, bool amx);

// The paths behind them (gemv_vnni.cpp; kernels_avx512.cpp / kernels_avx2.cpp for the float GEMV).
bool cpu_has_avx512_vnni();
// AMX-TILE and AMX-INT8, and the OS granted this process the tile state (asked once, on first call).
bool cpu_has_amx_int8();
void prepare_gemv_vnni(const QuantizedMatrix& w, const float* x, int64_t m, VnniActivations& a);
void gemv_rows_vnni(const QuantizedMatrix& w, const VnniActivations& a, int64_t m, int64_t row_begin,
                    int64_t row_end, float* out);
void prepare_gemv_avx512(const QuantizedMatrix& w, const float* x, int64_t m, GemvInputs& in);
void gemv_rows_avx512(const QuantizedMatrix& w, const GemvInputs& in, int64_t m, int64_t row_begin,
                      int64_t row_end, float* out);
void prepare_gemv_avx2(const QuantizedMatrix& w, const float* x, int64_t m, GemvInputs& in);
void gemv_rows_avx2(const QuantizedMatrix& w, const GemvInputs& in, int64_t m, int64_t row_begin,
                    int64_t row_end, float* out);

}  // namespace metal_marlin::cpu
