// Trellis matmul kernels: z[M, N] = xs[M, K] @ Q^T with Q decoded from the 16x16 tile streams in
// registers (docs/formats.md, "Trellis format"; decode: trellis_decode.h). Q never touches memory.
//
// The op y = hadamard_out(hadamard_in(x * su) @ Q^T) * sv + bias is three dispatches, in the order of
// the CPU op (metal_marlin/ops/trellis.py): hadamard_in_<had_in> (hadamard.metal) writes xs in float32,
// one of these kernels writes z in float32, hadamard_out_<had_out> applies H_out, sv and bias and writes
// half. The float32 intermediates cost 4 bytes per activation / output element, nothing next to the
// weights at decode, and a one-hot xs row reads Q back exactly (the conformance decode test).
//
// Instantiation: per codebook (3inst, 1mad, mcg, mul1) x K = 1..8 bits = 64 kernels,
// trellis_{gemv,gemm}_<codebook>_<K>. K is a template parameter because the decode is the ALU cost
// that matters: with K fixed, the window length, the word count and all eight state shifts are
// immediates and the loops unroll; a runtime K would add variable shifts and selects per state.
//
// trellis_gemv (M = 1..8, runtime M): grid (N/16), 128 threads = 4 simdgroups per tile row of 16
//   outputs; the simdgroups take the K/16 tile columns round-robin, so each tile's 8K words are read
//   once. A simdgroup decodes a whole tile per step (lane l: steps 8l..8l+7 = row l/2, columns
//   8(l%2)..+7: one aligned bit run, at most 4 word loads) and FMAs its 8 values against 8 floats of
//   each xs row (device loads that hit L1: every simdgroup of the grid reads the same xs). Lane pairs
//   reduce with one shuffle, the 4 simdgroups through 2 KiB of threadgroup memory ([4][8][16] floats).
//   Registers: 8 accumulators + 8 values + ~8 for the decode. N/16 threadgroups x 4 simdgroups = 1024
//   simdgroups at N = 4096: enough loads in flight for every M-series GPU.
//   bandwidth model: trellis_gemv: K/8 bytes of weight per weight, i.e. K_in*K/8 bytes per output
//   element at M = 1 (K = 4: 0.5 B/weight, 2 KiB per output at K_in = 4096) + the Hadamard passes
//   (hadamard.metal). ALU: ~12 ops per weight (bit run 2-4, codebook 5-8, 1 FMA per row), so at 400
//   GB/s (M2 Max, ~6.8 T ops/s) K = 4 needs ~9.6 T ops/s: ALU-bound, model ~65% of peak bandwidth;
//   K = 2 ~35%, K = 8 ~100% (memory-bound). Base M1 (68 GB/s, ~1.3 T ops/s): ~80% at K = 4.
// trellis_gemm (M > 8): grid (N/64, M/64), 128 threads = 4 simdgroups in a 2x2 grid, each owning a
//   32x32 quadrant of the 64x64 output tile (4x4 simdgroup_float8x8 accumulators, 32 floats per lane).
//   Per K step of one tile column: stage xs[64][16] (4 KiB, two float4 per thread) and the 4 tiles of
//   the block's 4 tile rows, one per simdgroup, transposed into Q^T[16][64] (4 KiB); two 8-deep MMA
//   steps of 16 multiply-accumulates per simdgroup. Threadgroup memory 8 KiB + 1 KiB of 8x8 spill
//   blocks (rows cut by M) = 9 KiB. Float staging: Apple GPUs have equal FP16/FP32 FMA rates, and
//   float tiles keep the accumulation in float32 with no conversions.
//   bandwidth model: trellis_gemm: K/8 bytes of weight per weight per 64 rows of M, each weight decoded
//   once per 64 rows (~12 ops against 64 MMA FMAs): compute-bound, well under 10% of DRAM bandwidth.
#include <metal_stdlib>

#include "trellis_decode.h"

using namespace metal;

constant constexpr uint kGemvSimdgroups = 4;
constant constexpr uint kGemvMaxRows = 8;

template <TrellisCodebook CB, uint K>
kernel void trellis_gemv(const device float* xs [[buffer(0)]],
                         const device uint* trellis [[buffer(1)]],
                         device float* z [[buffer(2)]],
                         constant TrellisMatmulParams& p [[buffer(3)]],
                         uint tile_row [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float partial[kGemvSimdgroups][kGemvMaxRows][16];
  const uint tiles_k = p.k / 16;
  const uint row = lane / 2;
  const uint col = (lane % 2) * 8;
  const device uint* tile_words = trellis + tile_row * tiles_k * (8 * K);

  float acc[kGemvMaxRows];
  for (uint m = 0; m < kGemvMaxRows; ++m) {
    acc[m] = 0.0f;
  }
  for (uint j = sg; j < tiles_k; j += kGemvSimdgroups) {
    float q[8];
    trellis_decode8<CB, K>(tile_words + j * (8 * K), lane * 8, q);
    const float4 q_lo = float4(q[0], q[1], q[2], q[3]);
    const float4 q_hi = float4(q[4], q[5], q[6], q[7]);
    const device float* x = xs + j * 16 + col;
#pragma clang loop unroll(full)
    for (uint m = 0; m < kGemvMaxRows; ++m) {
      if (m < p.m) {
        const device float4* xm = reinterpret_cast<const device float4*>(x + m * p.k);
        acc[m] += dot(xm[0], q_lo) + dot(xm[1], q_hi);
      }
    }
  }

  for (uint m = 0; m < kGemvMaxRows; ++m) {
    acc[m] += simd_shuffle_xor(acc[m], ushort(1));
    if (lane % 2 == 0) {
      partial[sg][m][row] = acc[m];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint m = tid / 16;
  const uint r = tid % 16;
  if (m < p.m) {
    float sum = 0.0f;
    for (uint s = 0; s < kGemvSimdgroups; ++s) {
      sum += partial[s][m][r];
    }
    z[m * p.n + tile_row * 16 + r] = sum;
  }
}

constant constexpr uint kGemmRows = 64;   // BM
constant constexpr uint kGemmCols = 64;   // BN: 4 tile rows
constant constexpr uint kGemmDepth = 16;  // BK: one tile column

template <TrellisCodebook CB, uint K>
kernel void trellis_gemm(const device float* xs [[buffer(0)]],
                         const device uint* trellis [[buffer(1)]],
                         device float* z [[buffer(2)]],
                         constant TrellisMatmulParams& p [[buffer(3)]],
                         uint2 group [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float a_tile[kGemmRows * kGemmDepth];  // xs rows, [64][16]
  threadgroup float b_tile[kGemmDepth * kGemmCols];  // Q^T, [16][64]
  threadgroup float spill[4][64];                    // one 8x8 block per simdgroup, for ragged rows

  const uint tiles_k = p.k / 16;
  const uint tiles_n = p.n / 16;
  const uint row0 = group.y * kGemmRows;
  const uint col0 = group.x * kGemmCols;
  const uint quad_row = (sg / 2) * 32;
  const uint quad_col = (sg % 2) * 32;
  // The tile row this simdgroup decodes (outside the matrix on the ragged last column block).
  const uint my_tile_row = col0 / 16 + sg;
  const device uint* tile_words = trellis + my_tile_row * tiles_k * (8 * K);
  const uint step_row = lane / 2;
  const uint step_col = (lane % 2) * 8;

  simdgroup_float8x8 acc[4][4];
  for (uint i = 0; i < 4; ++i) {
    for (uint jn = 0; jn < 4; ++jn) {
      acc[i][jn] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  for (uint j = 0; j < tiles_k; ++j) {
    // xs[row0 .. row0+63, 16j .. 16j+15]: 256 float4, two per thread; rows past M are zero.
    for (uint i = 0; i < 2; ++i) {
      const uint f = tid + 128 * i;
      const uint r = f / 4;
      const uint c = (f % 4) * 4;
      float4 v = float4(0.0f);
      if (row0 + r < p.m) {
        v = *reinterpret_cast<const device float4*>(xs + (row0 + r) * p.k + j * 16 + c);
      }
      for (uint e = 0; e < 4; ++e) {
        a_tile[r * kGemmDepth + c + e] = v[e];
      }
    }
    float q[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (my_tile_row < tiles_n) {
      trellis_decode8<CB, K>(tile_words + j * (8 * K), lane * 8, q);
    }
    for (uint e = 0; e < 8; ++e) {
      b_tile[(step_col + e) * kGemmCols + sg * 16 + step_row] = q[e];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (uint kk = 0; kk < kGemmDepth; kk += 8) {
      simdgroup_float8x8 a[4];
      simdgroup_float8x8 b[4];
      for (uint i = 0; i < 4; ++i) {
        simdgroup_load(a[i], a_tile + (quad_row + 8 * i) * kGemmDepth + kk, kGemmDepth);
        simdgroup_load(b[i], b_tile + kk * kGemmCols + quad_col + 8 * i, kGemmCols);
      }
      for (uint i = 0; i < 4; ++i) {
        for (uint jn = 0; jn < 4; ++jn) {
          simdgroup_multiply_accumulate(acc[i][jn], a[i], b[jn], acc[i][jn]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Full 8x8 blocks go straight to z; a block cut by M goes through this simdgroup's spill block.
  for (uint i = 0; i < 4; ++i) {
    const uint r0 = row0 + quad_row + 8 * i;
    for (uint jn = 0; jn < 4; ++jn) {
      const uint c0 = col0 + quad_col + 8 * jn;
      if (c0 >= p.n || r0 >= p.m) {
        continue;
      }
      if (r0 + 8 <= p.m) {
        simdgroup_store(acc[i][jn], z + r0 * p.n + c0, p.n);
        continue;
      }
      simdgroup_store(acc[i][jn], spill[sg], 8);
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (uint e = lane; e < 64; e += 32) {
        if (r0 + e / 8 < p.m) {
          z[(r0 + e / 8) * p.n + c0 + e % 8] = spill[sg][e];
        }
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
}

#define INSTANTIATE_TRELLIS(CB, NAME, K)                                                          \
  template [[host_name("trellis_gemv_" NAME "_" #K)]] [[kernel]] decltype(trellis_gemv<CB, K>) \
      trellis_gemv<CB, K>;                                                                        \
  template [[host_name("trellis_gemm_" NAME "_" #K)]] [[kernel]] decltype(trellis_gemm<CB, K>) \
      trellis_gemm<CB, K>;

#define INSTANTIATE_TRELLIS_CODEBOOK(CB, NAME) \
  INSTANTIATE_TRELLIS(CB, NAME, 1)             \
  INSTANTIATE_TRELLIS(CB, NAME, 2)             \
  INSTANTIATE_TRELLIS(CB, NAME, 3)             \
  INSTANTIATE_TRELLIS(CB, NAME, 4)             \
  INSTANTIATE_TRELLIS(CB, NAME, 5)             \
  INSTANTIATE_TRELLIS(CB, NAME, 6)             \
  INSTANTIATE_TRELLIS(CB, NAME, 7)             \
  INSTANTIATE_TRELLIS(CB, NAME, 8)

INSTANTIATE_TRELLIS_CODEBOOK(kTrellis3inst, "3inst")
INSTANTIATE_TRELLIS_CODEBOOK(kTrellis1mad, "1mad")
INSTANTIATE_TRELLIS_CODEBOOK(kTrellisMcg, "mcg")
INSTANTIATE_TRELLIS_CODEBOOK(kTrellisMul1, "mul1")
