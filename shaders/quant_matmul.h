// quant_matmul.h: what the host and the kernels of quant_matmul.metal agree on: the parameter struct
// and the launch geometry.
//
// Buffers (every kernel): 0 x [M, K] half, 1 packed [N, K*BITS/32] uint32, 2 scales [N, ceil(K/G)]
// half, 3 offsets (same shape; read by *_asym kernels only), 4 bias [N] half (read only if has_bias),
// 5 y [M, N] half, 6 QuantMatmulParams. Unread buffers still need a binding (any small buffer).
//
// Launch (threadgroups, threads per threadgroup):
//   quant_gemv_*  grid (ceil(N / QUANT_GEMV_ROWS), ceil(M / QUANT_GEMV_MAX_M)), QUANT_GEMV_THREADS
//   quant_gemm_*  grid (ceil(N / QUANT_GEMM_BN), ceil(M / QUANT_GEMM_BM)),       QUANT_GEMM_THREADS

#pragma once

struct QuantMatmulParams {
  uint M;           // rows of x and y
  uint N;           // output features (rows of W)
  uint K;           // input features, a multiple of 32
  uint group_size;  // weights per group along K, a multiple of 32 (K for per-channel); the last group may be shorter
  uint has_bias;    // 1: y += bias
};

enum : uint {
  QUANT_GEMV_SIMDGROUPS = 4,   // simdgroups of a GEMV threadgroup; they split K
  QUANT_GEMV_THREADS = 128,    // QUANT_GEMV_SIMDGROUPS * 32
  QUANT_GEMV_ROWS = 4,         // output features per GEMV threadgroup
  QUANT_GEMV_MAX_M = 8,        // activation rows per GEMV threadgroup
  QUANT_GEMM_BM = 32,          // GEMM tile: activation rows
  QUANT_GEMM_BN = 32,          //            output features
  QUANT_GEMM_BK = 32,          //            K step (one packing block)
  QUANT_GEMM_THREADS = 128,    // 4 simdgroups in a 2 x 2 grid, each owning a 16 x 16 output block
};
