// moe.h: what the host and the kernels of moe.metal agree on: the parameter struct, the buffers and
// the launch geometry of the routed-experts pipeline (the op metal_marlin::moe_experts).
//
// Pipeline (one encoder, four dispatches; P = tokens * top_k pairs, R = rows per work item):
//   1. moe_route           grid (1, 1, 1), MOE_ROUTE_THREADS threads.
//        0 top_k_index [P] int32 (E = ignore), 1 sorted_pairs [P] int32, 2 pair_position [P] int32,
//        3 items [max_items] uint4, 4 item_count [1] uint, 5 MoeParams.
//      Stable counting sort of the pairs by expert: sorted_pairs holds pair indices t * top_k + s grouped
//      by expert (each expert's pairs in pair order), pair_position[p] is the position of pair p in it
//      (-1: ignored slot). Each expert's run is cut into work items of at most R rows:
//      items[i] = (expert, first position, rows, 0); item_count = their number.
//      max_items = P / R + min(E, P) bounds the count (sum over experts of ceil(n_e / R)).
//   2. moe_gate_up_{gemv,gemm}_<fmt>   grid (ceil(I / features), max_items)
//        0 hidden [T, H] half, 1 packed [E, 2I, H*BITS/32], 2 scales [E, 2I, ceil(H/G)] half,
//        3 offsets (same; *_asym only), 4 sorted_pairs, 5 items, 6 item_count, 7 act [P, I] float,
//        8 MoeParams. act[pos] = silu(gate) * up for the token of sorted position pos.
//   3. moe_down_{gemv,gemm}_<fmt>      grid (ceil(H / features), max_items)
//        0 act [P, I] float, 1-3 down weights [E, H, ...], 4-6 as above, 7 expert_out [P, H] float,
//        8 MoeParams.
//   4. moe_combine          grid (ceil(H / (4 * MOE_COMBINE_THREADS)), T), MOE_COMBINE_THREADS threads.
//        0 expert_out [P, H] float, 1 pair_position, 2 top_k_weights [T, top_k] float, 3 out [T, H]
//        half, 4 MoeParams. out[t] = sum over slots s = 0..top_k-1 (in that order) of
//        top_k_weights[t, s] * expert_out[pair_position[t * top_k + s]].
// The gemv kernels need R = MOE_GEMV_ROWS (decode), the gemm kernels R = MOE_GEMM_BM (prefill); the
// host picks the pair by the number of pairs and passes the same R to moe_route. Unread buffers
// (offsets of symmetric formats) still need a binding.

#pragma once

struct MoeParams {
  uint tokens;          // T
  uint top_k;           // slots per token
  uint experts;         // E (at most MOE_MAX_EXPERTS); index E marks a slot to ignore
  uint hidden;          // H: gate_up's K and down's N (a multiple of 32)
  uint inter;           // I: down's K, gate_up has 2I rows (a multiple of 32)
  uint group_size;      // of both projections, a multiple of 32; >= K means one group per row
  uint rows_per_item;   // R
};

enum : uint {
  MOE_MAX_EXPERTS = 1024,
  MOE_ROUTE_THREADS = 256,
  MOE_COMBINE_THREADS = 64,     // 4 columns each
  MOE_THREADS = 128,            // every gemv / gemm threadgroup: 4 simdgroups
  MOE_GEMV_ROWS = 8,            // R of the gemv kernels: activation rows per item
  MOE_GEMV_GATE_UP_FEATURES = 2,  // act features per gate_up gemv threadgroup (2 gate + 2 up rows)
  MOE_GEMV_DOWN_FEATURES = 4,     // output features per down gemv threadgroup
  MOE_GEMM_BM = 32,             // R of the gemm kernels
  MOE_GEMM_BN = 32,             // output features per gemm threadgroup (gate_up: 32 gate + 32 up rows)
  MOE_GEMM_BK = 32,
};
