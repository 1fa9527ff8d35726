// moe.metal: the routed SwiGLU experts of a MoE layer with group-quantized weights (the op
// metal_marlin::moe_experts; reference metal_marlin/ops/experts.py; the CPU kernel
// csrc/cpu/moe_experts.cpp gathers the same way). Buffers, params and launch geometry: moe.h. Decode:
// quant_decode.h (the formats and instantiation names of quant_matmul.metal).
//
// Tokens are gathered per expert, so each active expert's weights are read once per call however many
// tokens chose it: moe_route counting-sorts the (token, slot) pairs by expert into work items of at
// most R rows of one expert; the matmul kernels run one threadgroup per (feature block, work item) and
// reach the item's rows through the sorted pair list (gate_up gathers hidden rows by token, down reads
// act rows by sorted position); moe_combine sums each token's slots in slot order (fixed, so results
// do not depend on scheduling). Intermediates are float32 (act [P, I], expert_out [P, H], P = T *
// top_k): a few KiB at decode; at prefill P*(I+H)*8 bytes, against 3*I*H weights per active expert.
//
// moe_route: one threadgroup of 256 threads; thread e counts expert e's pairs, sums the counts of the
//   experts below it (O(E) per thread, E <= 1024, 4 KiB of threadgroup memory), then writes its pairs
//   in pair order (a stable sort without atomics) and its work items; the thread of bucket E marks the
//   ignored slots and writes the item count.
//   bandwidth model: moe_route: each expert thread reads the P int32 indices twice (broadcast loads
//   from cache): ~1 us at decode (P = 8), ~0.5 ms at a 4096-token top-8 prefill (P = 32768), next to
//   tens of ms of expert matmuls there.
// moe_{gate_up,down}_gemv_<fmt> (R = 8, decode): the quant_gemv layout of quant_matmul.metal: 128
//   threads = 4 simdgroups splitting K in whole 32-code blocks, 4 weight rows per threadgroup (gate_up:
//   gate rows f, f+1 and up rows I+f, I+f+1, so SwiGLU is applied in the threadgroup: 2 act features;
//   down: 4 output features), each weight read once and used for the item's <= 8 rows; simd_sum and
//   512 B of threadgroup memory reduce. Grid (I/2 or H/4, max_items); threadgroups of items past
//   item_count exit at once (uniformly, before any barrier).
//   bandwidth model: moe_gemv: bits/8 + 2/G (+ 2/G asym) bytes per weight of each active expert, once
//   per call: Qwen3-30B-A3B decode (8 experts, I = 768, H = 2048) in int4 g128 reads 8 x 3 x 768 x
//   2048 x 0.516 B = 19.5 MB per layer, modelled like quant_gemv at 70-85% of DRAM bandwidth (the
//   one spare item row of max_items = P/R + min(E, P) is 1 of 9 rows of threadgroups, all exiting).
// moe_{gate_up,down}_gemm_<fmt> (R = 32, prefill): the quant_gemm layout: 32x32 output tile, 4
//   simdgroups in a 2x2 grid of 16x16 blocks (2x2 simdgroup_float8x8 each), K steps of 32; gate_up
//   stages two weight tiles (the gate and up rows of the same 32 features) into two accumulator sets
//   and applies SwiGLU in the epilogue. Threadgroup memory: x 32x36 + (1 or 2) x 32x33 floats = 8.8
//   KiB (down) or 13 KiB (gate_up); the tiles are reused to stage the results.
//   bandwidth model: moe_gemm: each weight is read and dequantized once per 32 rows of an expert,
//   K*(bits/8 + 2/G)/32 bytes per output element: compute-bound like quant_gemm.
// moe_combine: one thread per 4 columns of a token.
//   bandwidth model: moe_combine: top_k x 16 bytes of expert_out read and 8 bytes written per 4
//   columns: memory-bound, negligible next to the weights.

#include "quant_decode.h"  // first: it brings metal_stdlib, which moe.h (shared with the host) relies on
#include "moe.h"

using namespace metal;

inline float moe_silu(float g) { return g / (1.0f + exp(-g)); }

// Eight consecutive activations as two float4 (half or float rows; x is 16-byte aligned).
inline void load_x8(const device half* x, thread float4& a, thread float4& b) {
  const device half4* v = reinterpret_cast<const device half4*>(x);
  a = float4(v[0]);
  b = float4(v[1]);
}

inline void load_x8(const device float* x, thread float4& a, thread float4& b) {
  const device float4* v = reinterpret_cast<const device float4*>(x);
  a = v[0];
  b = v[1];
}

kernel void moe_route(const device int* top_k_index [[buffer(0)]],
                      device int* sorted_pairs [[buffer(1)]],
                      device int* pair_position [[buffer(2)]],
                      device uint4* items [[buffer(3)]],
                      device uint* item_count [[buffer(4)]],
                      constant MoeParams& p [[buffer(5)]],
                      uint tid [[thread_index_in_threadgroup]]) {
  threadgroup uint counts[MOE_MAX_EXPERTS];
  const uint pairs = p.tokens * p.top_k;
  const uint rows = p.rows_per_item;
  for (uint e = tid; e < p.experts; e += MOE_ROUTE_THREADS) {
    uint count = 0;
    for (uint q = 0; q < pairs; ++q) {
      count += top_k_index[q] == int(e) ? 1u : 0u;
    }
    counts[e] = count;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // Bucket e = E takes the ignored slots (any index outside 0..E-1) and writes the item count.
  for (uint e = tid; e <= p.experts; e += MOE_ROUTE_THREADS) {
    uint first = 0;
    uint item = 0;
    for (uint f = 0; f < e; ++f) {
      first += counts[f];
      item += (counts[f] + rows - 1) / rows;
    }
    if (e == p.experts) {
      for (uint q = 0; q < pairs; ++q) {
        const int index = top_k_index[q];
        if (index < 0 || index >= int(p.experts)) {
          pair_position[q] = -1;
        }
      }
      item_count[0] = item;
      continue;
    }
    uint position = first;
    for (uint q = 0; q < pairs; ++q) {
      if (top_k_index[q] == int(e)) {
        sorted_pairs[position] = int(q);
        pair_position[q] = int(position);
        ++position;
      }
    }
    for (uint r0 = 0; r0 < counts[e]; r0 += rows) {
      items[item++] = uint4(e, first + r0, min(rows, counts[e] - r0), 0u);
    }
  }
}

// The projection a matmul kernel computes: gate_up (K = H, 2I weight rows, SwiGLU into act [P, I]) or
// down (K = I, H weight rows, into expert_out [P, H]).
struct MoeProjection {
  uint k;            // input features
  uint features;     // output features: I (gate_up) or H (down)
  uint weight_rows;  // rows per expert: 2I or H
};

template <bool GATE_UP>
inline MoeProjection moe_projection(constant MoeParams& p) {
  MoeProjection proj;
  proj.k = GATE_UP ? p.hidden : p.inter;
  proj.features = GATE_UP ? p.inter : p.hidden;
  proj.weight_rows = GATE_UP ? 2 * p.inter : p.hidden;
  return proj;
}

// The x row of the pair at sorted position `position`: gate_up gathers the pair's token from hidden,
// down reads act at the sorted position itself.
template <bool GATE_UP>
inline uint moe_source_row(const device int* sorted_pairs, uint position, constant MoeParams& p) {
  return GATE_UP ? uint(sorted_pairs[position]) / p.top_k : position;
}

template <typename F, typename XT, bool GATE_UP>
[[kernel]] void moe_gemv(const device XT* x [[buffer(0)]],
                         const device uint* packed [[buffer(1)]],
                         const device half* scales [[buffer(2)]],
                         const device half* offsets [[buffer(3)]],
                         const device int* sorted_pairs [[buffer(4)]],
                         const device uint4* items [[buffer(5)]],
                         const device uint* item_count [[buffer(6)]],
                         device float* out [[buffer(7)]],
                         constant MoeParams& p [[buffer(8)]],
                         uint2 tgid [[threadgroup_position_in_grid]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  constexpr uint ROWS = 4;  // weight rows per threadgroup
  constexpr uint FEATURES = GATE_UP ? MOE_GEMV_GATE_UP_FEATURES : MOE_GEMV_DOWN_FEATURES;
  constexpr uint MAX_M = MOE_GEMV_ROWS;
  constexpr uint SIMDGROUPS = MOE_THREADS / 32;
  threadgroup float partial[SIMDGROUPS * MAX_M * ROWS];
  if (tgid.y >= item_count[0]) {
    return;
  }
  const uint4 item = items[tgid.y];
  const uint expert = item.x, first = item.y, rows_m = item.z;
  const MoeProjection proj = moe_projection<GATE_UP>(p);
  const uint f0 = tgid.x * FEATURES;
  const uint blocks = proj.k / 32;
  const uint row_words = blocks * F::BITS;
  const uint groups = (proj.k + p.group_size - 1) / p.group_size;
  const uint blocks_per_group = p.group_size / 32;
  const device uint* expert_packed = packed + expert * proj.weight_rows * row_words;
  const uint expert_group0 = expert * proj.weight_rows * groups;

  // Weight rows of this threadgroup; features past the end re-read the last one (in bounds, never stored).
  uint w_row[ROWS];
  for (uint r = 0; r < ROWS; ++r) {
    const uint feature = min(f0 + r % FEATURES, proj.features - 1);
    w_row[r] = GATE_UP && r >= FEATURES ? p.inter + feature : feature;
  }
  const device XT* x_row[MAX_M];
  for (uint m = 0; m < MAX_M; ++m) {
    const uint position = first + min(m, rows_m - 1);
    x_row[m] = x + moe_source_row<GATE_UP>(sorted_pairs, position, p) * proj.k;
  }

  float acc[MAX_M][ROWS];
  for (uint m = 0; m < MAX_M; ++m) {
    for (uint r = 0; r < ROWS; ++r) {
      acc[m][r] = 0.0f;
    }
  }
  for (uint b = sg * 32 + lane; b < blocks; b += SIMDGROUPS * 32) {
    uint words[ROWS][F::BITS];
    GroupScale gs[ROWS];
    for (uint r = 0; r < ROWS; ++r) {
      load_block<F::BITS>(expert_packed + w_row[r] * row_words + b * F::BITS, words[r]);
      gs[r] = group_scale<F>(scales, offsets, expert_group0 + w_row[r] * groups + b / blocks_per_group);
    }
    for (uint j = 0; j < 4; ++j) {
      float w[ROWS][8];
      for (uint r = 0; r < ROWS; ++r) {
        dequant_chunk<F>(&words[r][0], j, gs[r], w[r]);
      }
      for (uint m = 0; m < MAX_M; ++m) {
        if (m < rows_m) {
          float4 xa, xb;
          load_x8(x_row[m] + b * 32 + 8 * j, xa, xb);
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
        if (lane == 0) {
          partial[(sg * MAX_M + m) * ROWS + r] = s;
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint t = sg * 32 + lane;
  const uint m = t / FEATURES, f = t % FEATURES;
  if (m < rows_m && f0 + f < proj.features) {
    float sums[ROWS / FEATURES];
    for (uint h = 0; h < ROWS / FEATURES; ++h) {
      sums[h] = 0.0f;
      for (uint s = 0; s < SIMDGROUPS; ++s) {
        sums[h] += partial[(s * MAX_M + m) * ROWS + h * FEATURES + f];
      }
    }
    out[(first + m) * proj.features + f0 + f] = GATE_UP ? moe_silu(sums[0]) * sums[ROWS / FEATURES - 1] : sums[0];
  }
}

template <typename F, typename XT, bool GATE_UP>
[[kernel]] void moe_gemm(const device XT* x [[buffer(0)]],
                         const device uint* packed [[buffer(1)]],
                         const device half* scales [[buffer(2)]],
                         const device half* offsets [[buffer(3)]],
                         const device int* sorted_pairs [[buffer(4)]],
                         const device uint4* items [[buffer(5)]],
                         const device uint* item_count [[buffer(6)]],
                         device float* out [[buffer(7)]],
                         constant MoeParams& p [[buffer(8)]],
                         uint2 tgid [[threadgroup_position_in_grid]],
                         uint t [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BM = MOE_GEMM_BM, BN = MOE_GEMM_BN, BK = MOE_GEMM_BK;
  constexpr uint X_STRIDE = BK + 4, W_STRIDE = BN + 1;
  constexpr uint SETS = GATE_UP ? 2 : 1;  // weight tiles: gate and up, or down
  static_assert(BM * BK == 8 * MOE_THREADS && BN * BK == 8 * MOE_THREADS,
                "each thread stages 8 activations and 8 weights per set and K step");
  threadgroup float x_tile[BM * X_STRIDE];         // x rows of the item; later down's output tile
  threadgroup float w_tile[SETS * BK * W_STRIDE];  // dequantized weights, transposed; later gate/up tiles
  if (tgid.y >= item_count[0]) {
    return;
  }
  const uint4 item = items[tgid.y];
  const uint expert = item.x, first = item.y, rows_m = item.z;
  const MoeProjection proj = moe_projection<GATE_UP>(p);
  const uint f0 = tgid.x * BN;
  const uint row_words = proj.k / 32 * F::BITS;
  const uint groups = (proj.k + p.group_size - 1) / p.group_size;

  // Staging role: tile row (item row and feature) and 8-code chunk of the K step. Rows past the item
  // and features past the end read valid rows (in bounds); their results are never stored.
  const uint tile_row = t / 4, chunk = t % 4;
  const uint position = first + min(tile_row, rows_m - 1);
  const device XT* x_src = x + moe_source_row<GATE_UP>(sorted_pairs, position, p) * proj.k + 8 * chunk;
  const uint feature = min(f0 + tile_row, proj.features - 1);
  uint w_row[SETS];
  for (uint s = 0; s < SETS; ++s) {
    w_row[s] = expert * proj.weight_rows + s * p.inter + feature;
  }

  const uint sg_m = (sg / 2) * 16, sg_n = (sg % 2) * 16;
  simdgroup_float8x8 acc[SETS][2][2];
  for (uint s = 0; s < SETS; ++s) {
    for (uint i = 0; i < 2; ++i) {
      for (uint jj = 0; jj < 2; ++jj) {
        acc[s][i][jj] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
    }
  }

  for (uint k0 = 0; k0 < proj.k; k0 += BK) {
    float4 xa, xb;
    load_x8(x_src + k0, xa, xb);
    threadgroup float* x_dst = x_tile + tile_row * X_STRIDE + 8 * chunk;
    for (uint i = 0; i < 4; ++i) {
      x_dst[i] = xa[i];
      x_dst[i + 4] = xb[i];
    }
    for (uint s = 0; s < SETS; ++s) {
      float w[8];
      dequant_chunk<F>(packed + w_row[s] * row_words + (k0 / 32) * F::BITS, chunk,
                       group_scale<F>(scales, offsets, w_row[s] * groups + k0 / p.group_size), w);
      for (uint i = 0; i < 8; ++i) {
        w_tile[s * BK * W_STRIDE + (8 * chunk + i) * W_STRIDE + tile_row] = w[i];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (uint kk = 0; kk < BK; kk += 8) {
      simdgroup_float8x8 a[2];
      for (uint i = 0; i < 2; ++i) {
        simdgroup_load(a[i], x_tile + (sg_m + 8 * i) * X_STRIDE + kk, X_STRIDE);
      }
      for (uint s = 0; s < SETS; ++s) {
        simdgroup_float8x8 b[2];
        for (uint jj = 0; jj < 2; ++jj) {
          simdgroup_load(b[jj], w_tile + s * BK * W_STRIDE + kk * W_STRIDE + sg_n + 8 * jj, W_STRIDE);
        }
        for (uint i = 0; i < 2; ++i) {
          for (uint jj = 0; jj < 2; ++jj) {
            simdgroup_multiply_accumulate(acc[s][i][jj], a[i], b[jj], acc[s][i][jj]);
          }
        }
      }
    }
    // The next step overwrites the tiles this one reads.
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Results through threadgroup memory (set s into w_tile's set s, or x_tile for down), then each
  // thread writes 8 features of its tile row.
  for (uint s = 0; s < SETS; ++s) {
    threadgroup float* dst = GATE_UP ? w_tile + s * BK * W_STRIDE : x_tile;
    const uint stride = GATE_UP ? W_STRIDE : X_STRIDE;
    for (uint i = 0; i < 2; ++i) {
      for (uint jj = 0; jj < 2; ++jj) {
        simdgroup_store(acc[s][i][jj], dst + (sg_m + 8 * i) * stride + sg_n + 8 * jj, stride);
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  if (tile_row < rows_m) {
    for (uint i = 0; i < 8; ++i) {
      const uint f = 8 * chunk + i;
      if (f0 + f < proj.features) {
        const uint at = tile_row * (GATE_UP ? W_STRIDE : X_STRIDE) + f;
        const float v = GATE_UP ? moe_silu(w_tile[at]) * w_tile[BK * W_STRIDE + at] : x_tile[at];
        out[(first + tile_row) * proj.features + f0 + f] = v;
      }
    }
  }
}

kernel void moe_combine(const device float* expert_out [[buffer(0)]],
                        const device int* pair_position [[buffer(1)]],
                        const device float* top_k_weights [[buffer(2)]],
                        device half* out [[buffer(3)]],
                        constant MoeParams& p [[buffer(4)]],
                        uint2 tgid [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]]) {
  const uint token = tgid.y;
  const uint col = (tgid.x * MOE_COMBINE_THREADS + tid) * 4;
  if (col >= p.hidden) {
    return;
  }
  float4 sum = float4(0.0f);
  for (uint s = 0; s < p.top_k; ++s) {
    const uint pair = token * p.top_k + s;
    const int position = pair_position[pair];
    if (position >= 0) {
      const device float4* y = reinterpret_cast<const device float4*>(expert_out + uint(position) * p.hidden + col);
      sum += top_k_weights[pair] * y[0];
    }
  }
  *reinterpret_cast<device half4*>(out + token * p.hidden + col) = half4(sum);
}

// The format trait may contain a comma (IntFormat<4, true>), hence the variadic parameter.
#define INSTANTIATE_MOE(NAME, ...)                                                                      \
  template [[host_name("moe_gate_up_gemv_" NAME)]] [[kernel]] decltype(moe_gemv<__VA_ARGS__, half, true>) \
      moe_gemv<__VA_ARGS__, half, true>;                                                               \
  template [[host_name("moe_down_gemv_" NAME)]] [[kernel]] decltype(moe_gemv<__VA_ARGS__, float, false>)  \
      moe_gemv<__VA_ARGS__, float, false>;                                                             \
  template [[host_name("moe_gate_up_gemm_" NAME)]] [[kernel]] decltype(moe_gemm<__VA_ARGS__, half, true>) \
      moe_gemm<__VA_ARGS__, half, true>;                                                               \
  template [[host_name("moe_down_gemm_" NAME)]] [[kernel]] decltype(moe_gemm<__VA_ARGS__, float, false>)  \
      moe_gemm<__VA_ARGS__, float, false>;

INSTANTIATE_MOE("int8", IntFormat<8, false>)
INSTANTIATE_MOE("int8_asym", IntFormat<8, true>)
INSTANTIATE_MOE("int4", IntFormat<4, false>)
INSTANTIATE_MOE("int4_asym", IntFormat<4, true>)
INSTANTIATE_MOE("int3", IntFormat<3, false>)
INSTANTIATE_MOE("int3_asym", IntFormat<3, true>)
INSTANTIATE_MOE("int2", IntFormat<2, false>)
INSTANTIATE_MOE("int2_asym", IntFormat<2, true>)
INSTANTIATE_MOE("fp4", Fp4Format)
INSTANTIATE_MOE("fp8", Fp8Format)
