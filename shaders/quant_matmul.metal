// quant_matmul.metal: y = x @ dequant(W)^T + bias for the group-quantized formats (docs/formats.md;
// the op metal_marlin::quant_matmul). x [M, K] and y [M, N] are half, W is [N, K] as packed uint32
// words with half scales (and offsets); float accumulation. Buffers, params and launch geometry:
// quant_matmul.h. Decode: quant_decode.h. One instantiation per format and symmetry:
// quant_{gemv,gemm}_{int8,int4,int3,int2}[_asym], quant_{gemv,gemm}_{fp4,fp8}.
//
// Weight bytes per weight (plus 2 bytes of scale, and 2 of offset for _asym, per group of G):
//   int8, fp8: 1    int4, fp4: 0.5    int3: 0.375    int2: 0.25
//
// quant_gemv (decode, M = 1..8; any M works, 8 rows per threadgroup along grid.y).
//   Threadgroup: 128 threads = 4 simdgroups, producing 4 output features x up to 8 activation rows.
//   Every thread takes whole 32-code blocks (block = sg*32 + lane, stepping by 128), so the 4
//   simdgroups split K and each weight byte is read exactly once, in 16-byte (uint4) loads for 4 and
//   8 bits (one 128-byte line per 8 lanes), 8-byte for 2 bits, three 4-byte loads for 3 bits. A block
//   of one row is dequantized once and used for every activation row. Partial sums: simd_sum per
//   simdgroup, then 4 x 8 x 4 floats (512 B) of threadgroup memory, summed in a fixed order.
//   Registers: 4 rows x BITS words + 4 x 8 dequantized weights + 8 x 4 accumulators + 8 x values,
//   about 100 32-bit registers for int8 at M = 8 (fewer at M = 1, where the compiler drops the unused
//   accumulators only if it can; Apple GPUs keep full occupancy up to about 104 registers/thread).
//   4 features per threadgroup gives N/4 threadgroups (1024 for N = 4096): enough to fill every core
//   of the largest M-series GPU with loads in flight. K < 4096 leaves threads idle (K = 2048: the
//   last two simdgroups), the price of whole-block 16-byte loads; the loads in flight still suffice.
//   bandwidth model: at M = 1 an output element reads K*(BITS/8 + 2/G [+ 2/G asym]) bytes of weight
//   (int4 g128, K = 4096: 2112 B; int8: 4160 B; int2: 1088 B) from DRAM, plus 2K bytes of x per
//   threadgroup from cache. ALU: ~5 ops per weight (shift, mask, convert, dequant fma, dot fma; int3
//   ~3 more, fp4/fp8 ~6 more) against a machine balance of ~17-19 ops per DRAM byte (M1: 1.3 Tops
//   / 68 GB/s, M2 Max: 6.8 Tops / 400 GB/s). int8 (5 ops/B) and int4 (10) are memory-bound: model
//   70-85% of peak bandwidth (int4 4096x4096 g128 = 8.7 MB: ~100-125 us at 100 GB/s); fp8 (11) the
//   same; fp4 (22), int3 (21) and int2 (20) are ALU-bound near the balance point: ~60-75% of peak.
//   Each further activation row adds one fma per weight (M = 8: +7 ops), so at M = 8 only int8/fp8
//   stay memory-bound; the others take ~1.5-2.5x their M = 1 time.
//
// quant_gemm (prefill, M > 8).
//   Threadgroup: 128 threads = 4 simdgroups in a 2 x 2 grid; output tile 32 x 32 (BM x BN), each
//   simdgroup owns 16 x 16 = 2 x 2 simdgroup_matrix<float, 8, 8> accumulators. K steps of 32 (one
//   packing block, so K is never ragged): the 128 threads each stage 8 activations (two half4 loads)
//   and dequantize 8 weights (one 8-code chunk of one row) into threadgroup memory, then each
//   simdgroup runs 4 x (2 x 2) 8x8x8 multiply-accumulates. Tiles are float (x is half, so staging
//   it in float is exact, and the dequantized weights are the reference's float32 values); on Apple
//   GPUs float and half FMA rates are equal, so only threadgroup memory is spent: x tile 32 x 33 and
//   transposed weight tile 32 x 33 floats = 8.25 KiB (the x tile is reused to stage the output),
//   three threadgroups per 32 KiB. The one-float row padding spreads the staging writes of a
//   simdgroup (8 rows x 4 chunks) over 32 distinct banks. Ragged M and N: loads clamp to the last
//   valid row (always in bounds) and the results of those rows are never stored.
//   bandwidth model: each weight is read (and dequantized) once per 32-row M tile: K*(BITS/8 + 2/G)/32
//   bytes of weight per output element plus 2K/32 of x (mostly from cache): for int4 g128 0.016 B of
//   weight and 0.06 B of x per multiply-add, so compute-bound (simdgroup MMA plus ~5 dequant ops per
//   weight per M tile), using well under 20% of DRAM bandwidth at M >= 32.

#include "quant_decode.h"
#include "quant_matmul.h"

template <typename F>
[[kernel]] void quant_gemv(
    const device half* x [[buffer(0)]],
    const device uint* packed [[buffer(1)]],
    const device half* scales [[buffer(2)]],
    const device half* offsets [[buffer(3)]],
    const device half* bias [[buffer(4)]],
    device half* y [[buffer(5)]],
    constant QuantMatmulParams& p [[buffer(6)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint ROWS = QUANT_GEMV_ROWS, MAX_M = QUANT_GEMV_MAX_M, SIMDGROUPS = QUANT_GEMV_SIMDGROUPS;
  threadgroup float partial[SIMDGROUPS * MAX_M * ROWS];

  const uint n0 = tgid.x * ROWS;
  const uint m0 = tgid.y * MAX_M;
  const uint rows_m = min(MAX_M, p.M - m0);
  const uint blocks = p.K / 32;
  const uint row_words = blocks * F::BITS;
  const uint groups = (p.K + p.group_size - 1) / p.group_size;
  const uint blocks_per_group = p.group_size / 32;

  // Features past N re-read row N-1 (in bounds, no divergence); their sums are never stored.
  uint n_row[ROWS];
  for (uint r = 0; r < ROWS; ++r) n_row[r] = min(n0 + r, p.N - 1);

  float acc[MAX_M][ROWS];
  for (uint m = 0; m < MAX_M; ++m)
    for (uint r = 0; r < ROWS; ++r) acc[m][r] = 0.0f;

  for (uint b = sg * 32 + lane; b < blocks; b += SIMDGROUPS * 32) {
    uint words[ROWS][F::BITS];
    GroupScale gs[ROWS];
    for (uint r = 0; r < ROWS; ++r) {
      load_block<F::BITS>(packed + n_row[r] * row_words + b * F::BITS, words[r]);
      gs[r] = group_scale<F>(scales, offsets, n_row[r] * groups + b / blocks_per_group);
    }
    for (uint j = 0; j < 4; ++j) {
      float w[ROWS][8];
      for (uint r = 0; r < ROWS; ++r) dequant_chunk<F>(&words[r][0], j, gs[r], w[r]);
      for (uint m = 0; m < MAX_M; ++m) {
        if (m < rows_m) {
          const device half4* xv = reinterpret_cast<const device half4*>(x + (m0 + m) * p.K + b * 32 + 8 * j);
          const float4 xa = float4(xv[0]), xb = float4(xv[1]);
          for (uint r = 0; r < ROWS; ++r) {
            acc[m][r] += dot(xa, float4(w[r][0], w[r][1], w[r][2], w[r][3])) +
                         dot(xb, float4(w[r][4], w[r][5], w[r][6], w[r][7]));
          }
        }
      }
    }
  }

  for (uint m = 0; m < MAX_M; ++m) {
    if (m < rows_m) {
      for (uint r = 0; r < ROWS; ++r) {
        const float s = simd_sum(acc[m][r]);
        if (lane == 0) partial[(sg * MAX_M + m) * ROWS + r] = s;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint t = sg * 32 + lane;
  const uint m = t / ROWS, r = t % ROWS;
  if (m < rows_m && n0 + r < p.N) {
    float sum = 0.0f;
    for (uint s = 0; s < SIMDGROUPS; ++s) sum += partial[(s * MAX_M + m) * ROWS + r];
    if (p.has_bias) sum += float(bias[n0 + r]);
    y[(m0 + m) * p.N + n0 + r] = half(sum);
  }
}

template <typename F>
[[kernel]] void quant_gemm(
    const device half* x [[buffer(0)]],
    const device uint* packed [[buffer(1)]],
    const device half* scales [[buffer(2)]],
    const device half* offsets [[buffer(3)]],
    const device half* bias [[buffer(4)]],
    device half* y [[buffer(5)]],
    constant QuantMatmulParams& p [[buffer(6)]],
    uint2 tgid [[threadgroup_position_in_grid]],
    uint t [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BM = QUANT_GEMM_BM, BN = QUANT_GEMM_BN, BK = QUANT_GEMM_BK;
  constexpr uint X_STRIDE = BK + 1, W_STRIDE = BN + 1;
  static_assert(BN <= X_STRIDE, "the x tile also stages the BM x BN output");
  static_assert(BM * BK == 8 * QUANT_GEMM_THREADS && BN * BK == 8 * QUANT_GEMM_THREADS,
                "each thread stages 8 activations and 8 weights per K step");
  threadgroup float x_tile[BM * X_STRIDE];   // x[m0 .. m0+BM, k0 .. k0+BK], later y's tile
  threadgroup float w_tile[BK * W_STRIDE];   // dequant(W)[n0 .. n0+BN, k0 .. k0+BK], transposed

  const uint m0 = tgid.y * BM, n0 = tgid.x * BN;
  // Staging role: tile row (activation row and weight row) and 8-code chunk of the K step.
  const uint tile_row = t / 4, chunk = t % 4;
  // Rows past M or N read the last valid row (in bounds); their results are never stored.
  const uint x_row = min(m0 + tile_row, p.M - 1);
  const uint w_row = min(n0 + tile_row, p.N - 1);
  const uint row_words = p.K / 32 * F::BITS;
  const uint groups = (p.K + p.group_size - 1) / p.group_size;
  const device half* x_src = x + x_row * p.K + 8 * chunk;
  const device uint* w_src = packed + w_row * row_words;

  const uint sg_m = (sg / 2) * 16, sg_n = (sg % 2) * 16;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (uint i = 0; i < 2; ++i)
    for (uint jj = 0; jj < 2; ++jj) acc[i][jj] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (uint k0 = 0; k0 < p.K; k0 += BK) {
    const device half4* xv = reinterpret_cast<const device half4*>(x_src + k0);
    const float4 xa = float4(xv[0]), xb = float4(xv[1]);
    threadgroup float* x_dst = x_tile + tile_row * X_STRIDE + 8 * chunk;
    for (uint i = 0; i < 4; ++i) {
      x_dst[i] = xa[i];
      x_dst[i + 4] = xb[i];
    }
    float w[8];
    dequant_chunk<F>(w_src + (k0 / 32) * F::BITS, chunk,
                     group_scale<F>(scales, offsets, w_row * groups + k0 / p.group_size), w);
    for (uint i = 0; i < 8; ++i) w_tile[(8 * chunk + i) * W_STRIDE + tile_row] = w[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (uint kk = 0; kk < BK; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[2], b[2];
      for (uint i = 0; i < 2; ++i) {
        simdgroup_load(a[i], x_tile + (sg_m + 8 * i) * X_STRIDE + kk, X_STRIDE);
        simdgroup_load(b[i], w_tile + kk * W_STRIDE + sg_n + 8 * i, W_STRIDE);
      }
      for (uint i = 0; i < 2; ++i)
        for (uint jj = 0; jj < 2; ++jj) simdgroup_multiply_accumulate(acc[i][jj], a[i], b[jj], acc[i][jj]);
    }
    // The next step overwrites the tiles this one reads.
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (uint i = 0; i < 2; ++i)
    for (uint jj = 0; jj < 2; ++jj)
      simdgroup_store(acc[i][jj], x_tile + (sg_m + 8 * i) * X_STRIDE + sg_n + 8 * jj, X_STRIDE);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint m = m0 + tile_row;
  if (m < p.M) {
    for (uint i = 0; i < 8; ++i) {
      const uint n = n0 + 8 * chunk + i;
      if (n < p.N) {
        float v = x_tile[tile_row * X_STRIDE + 8 * chunk + i];
        if (p.has_bias) v += float(bias[n]);
        y[m * p.N + n] = half(v);
      }
    }
  }
}

// The format trait may contain a comma (IntFormat<4, true>), hence the variadic parameter.
#define INSTANTIATE_QUANT_MATMUL(NAME, ...)                                                      \
  template [[host_name("quant_gemv_" NAME)]] [[kernel]] decltype(quant_gemv<__VA_ARGS__>)       \
      quant_gemv<__VA_ARGS__>;                                                                  \
  template [[host_name("quant_gemm_" NAME)]] [[kernel]] decltype(quant_gemm<__VA_ARGS__>)       \
      quant_gemm<__VA_ARGS__>;

INSTANTIATE_QUANT_MATMUL("int8", IntFormat<8, false>)
INSTANTIATE_QUANT_MATMUL("int8_asym", IntFormat<8, true>)
INSTANTIATE_QUANT_MATMUL("int4", IntFormat<4, false>)
INSTANTIATE_QUANT_MATMUL("int4_asym", IntFormat<4, true>)
INSTANTIATE_QUANT_MATMUL("int3", IntFormat<3, false>)
INSTANTIATE_QUANT_MATMUL("int3_asym", IntFormat<3, true>)
INSTANTIATE_QUANT_MATMUL("int2", IntFormat<2, false>)
INSTANTIATE_QUANT_MATMUL("int2_asym", IntFormat<2, true>)
INSTANTIATE_QUANT_MATMUL("fp4", Fp4Format)
INSTANTIATE_QUANT_MATMUL("fp8", Fp8Format)
