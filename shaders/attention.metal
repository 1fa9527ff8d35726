// attention.metal: decode attention over paged caches (GQA, and MLA's latent cache in absorbed form)
// and causal flash attention for prefill. Buffers, parameters and launch geometry: attention.h.
//
// All three use the online softmax: a running row maximum m and sum l per query, each new score
// block rescales the accumulated output by exp(m_old - m_new). Scores are kept in log2 units (the
// scale is multiplied by log2(e) once) so every exponential is one exp2. Accumulation is float, I/O
// half. "Minus infinity" is the finite -1e30 because Metal compiles with fast math, where infinities
// are not guaranteed; masked positions get probability exactly 0 by a select, not through exp2.
//
// paged_gqa_decode (one query per sequence; a bandwidth problem: every K/V byte is used for `group`
//   dot products and no more). Threadgroup = one kv head of one sequence and up to 4 of its query
//   heads, so each K/V row is read once for the whole group (up to 4 heads). 8 simdgroups (256
//   threads) take the sequence's blocks round-robin; within a simdgroup each lane holds D/32
//   consecutive elements of the query (registers) and of each K/V row, so one K row (D halfs, 128
//   or 256 B) is one contiguous read of the simdgroup and one simd_sum per head gives a score. Every
//   simdgroup keeps its own (m, l, o) per head; they are merged at the end in threadgroup memory:
//   256 B of (m, l) plus 8 x D floats (2 KiB at D = 64, 4 KiB at D = 128), so occupancy is bounded by
//   registers, not threadgroup memory. KV bytes read per output element: 4 * context / min(group, 4)
//   (two D-half rows per position serve min(group, 4) * D outputs).
// bandwidth model: paged_gqa_decode reads 4 * kv_heads * D bytes of K/V per cached token per layer
//   (Llama-3-8B: 8 x 128 -> 4 KiB; 128 KiB per token over 32 layers; a step at context 4096 reads
//   537 MB = 1.3 ms at M2 Max's 400 GB/s, 5.4 ms at M2's 100 GB/s). Intensity is `group` flops per
//   byte, far under the ~35 flops/B balance of M-series GPUs, so the model is 70-80% of peak DRAM
//   bandwidth once batch * kv_heads * ceil(group / 4) threadgroups fill the cores (>= 2 per core);
//   at batch 1 (8 threadgroups for Llama-3-8B) it is latency-bound: a split-context pass is future work.
//
// paged_mla_decode (absorbed MLA: one shared latent "kv head", scores over RANK + ROPE = 576 depth,
//   values = the 512 latents). Many heads share each cache row and each row costs 2176 flops per
//   head, so this is a small GEMM per step and runs on simdgroup_matrix 8x8: a threadgroup takes 8
//   query heads (the rows of the score matrix) and 8 cache positions per step (the columns). 4
//   simdgroups (128 threads): positions are gathered through the block table into threadgroup memory
//   (8 rows x (RANK + ROPE + 8) halfs = 9.1 KiB, zeros past the context), each simdgroup computes the
//   8x8 scores over a quarter of the depth (queries kept in registers as half fragments), the four
//   partial score blocks meet in threadgroup memory (1 KiB), every simdgroup runs the same softmax
//   on their sum, then multiplies the probabilities with its quarter of the latent columns (128 of
//   512: 16 float accumulators). 10.4 KiB of threadgroup memory, so three threadgroups fit in 32 KiB;
//   ~60 registers per lane (18 half query fragments, 16 float accumulators). KV bytes per output
//   element: 2 * (RANK + ROPE) * context / (8 * RANK) = 0.28 * context B from cache (the row is read
//   by ceil(heads / 8) threadgroups; DRAM sees it about once when they run together).
// bandwidth model: paged_mla_decode reads 2 * (RANK + ROPE) = 1152 B per cached token per layer
//   (GLM-4.7-Flash, 47 layers: 54 KB per token; context 4096: 222 MB per step = 0.55 ms at 400 GB/s).
//   Compute is 2176 flops per token and head: GLM's 20 heads give 38 flops/B, about the M2 Max
//   balance (13.6 TFLOPS / 400 GB/s), so the model is ~60% of peak bandwidth; DeepSeek-V3's 128 heads
//   (242 flops/B) are compute-bound on the simdgroup matrix units.
//
// flash_prefill (compute-bound: 4 * D flops per visible query/key pair). Threadgroup = 32 queries of
//   one head (4 simdgroups x 8 rows, 128 threads); key tiles of BK = 32 (D = 64) or 16 (D = 128)
//   positions, K and V staged in threadgroup memory with rows padded by 8 halfs (2 * BK * (D + 8)
//   halfs: 9 KiB at D = 64, 8.5 KiB at D = 128; the query tile is staged in the same space first).
//   Per simdgroup: the query rows as D/8 half fragments, S = Q K^T as BK/8 float fragments (K
//   loaded transposed from threadgroup memory), the softmax on the fragments in registers (a row's 8
//   columns sit in 4 lanes), O += P V into D/8 float accumulators. Registers: 16 half + 16 float
//   fragments at D = 128; ~9 KiB of threadgroup memory lets three threadgroups share 32 KiB. KV bytes
//   per output element: kv_len / 8 (4 * kv_len * D bytes of K/V per 32 x D outputs), served by L2
//   for all q tiles and heads of a kv group.
// bandwidth model: flash_prefill does 4 * BQ * BK * D flops per 4 * BK * D bytes staged = 32 flops
//   per byte of L2 traffic, and reads each K/V byte from DRAM about once per kv group; a 2048-token
//   prompt with 32 heads of 128 costs 34 GFLOP per layer (causal half), ~3.4 ms at an assumed
//   10 TFLOPS of sustained half matrix throughput (M2 Max): compute-bound, DRAM share below 10%.

#include <metal_stdlib>
using namespace metal;

#include "attention.h"

// The softmax runs in log2 units: exp(x * scale) = exp2(x * scale * log2(e)).
inline float log2_scale(float scale) { return scale * 1.4426950408889634f; }

// Finite "minus infinity" (fast math does not promise infinities).
constexpr constant float kNoScore = -1.0e30f;

// Lane layout of an 8x8 simdgroup_matrix on Apple GPUs (the one MLX relies on): lane l holds row
// frag_row(l), columns frag_col(l) and frag_col(l) + 1. The four lanes of a row differ in bits 0 and 3.
inline ushort frag_row(ushort lane) { return ((lane >> 4) << 2) | ((lane >> 1) & 3); }
inline ushort frag_col(ushort lane) { return (((lane >> 3) & 1) << 2) | ((lane & 1) << 1); }

inline float row_max(float x) {
  x = max(x, simd_shuffle_xor(x, ushort(1)));
  return max(x, simd_shuffle_xor(x, ushort(8)));
}

inline float row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

// One online-softmax step for the 8 query rows of a simdgroup. scores[j] (8x8, column c = key
// key0 + 8 j + c) become probabilities in place; keys >= key_end (per row: this lane's row) get
// probability 0. The accumulators out[] and the lane's partial row sum are rescaled to the new row
// maximum. Every lane must call it (row reductions are simdgroup shuffles).
template <int SCORE_TILES, int OUT_TILES>
inline void online_softmax_step(thread simdgroup_float8x8* scores, thread simdgroup_float8x8* out,
                                thread float& row_maximum, thread float& lane_sum, float scale_log2,
                                uint key0, uint key_end, ushort lane) {
  const uint key_lane = key0 + frag_col(lane);
  float tile_max = kNoScore;
  for (int j = 0; j < SCORE_TILES; ++j) {
    for (int e = 0; e < 2; ++e) {
      const float x = key_lane + 8 * j + e < key_end ? scores[j].thread_elements()[e] * scale_log2 : kNoScore;
      scores[j].thread_elements()[e] = x;
      tile_max = max(tile_max, x);
    }
  }
  const float new_max = max(row_maximum, row_max(tile_max));
  const float rescale = exp2(row_maximum - new_max);
  float tile_sum = 0.0f;
  for (int j = 0; j < SCORE_TILES; ++j) {
    for (int e = 0; e < 2; ++e) {
      const float x = scores[j].thread_elements()[e];
      const float prob = key_lane + 8 * j + e < key_end ? exp2(x - new_max) : 0.0f;
      scores[j].thread_elements()[e] = prob;
      tile_sum += prob;
    }
  }
  for (int j = 0; j < OUT_TILES; ++j) {
    out[j].thread_elements()[0] *= rescale;
    out[j].thread_elements()[1] *= rescale;
  }
  lane_sum = lane_sum * rescale + tile_sum;
  row_maximum = new_max;
}

// ---- paged GQA decode ---------------------------------------------------------------------------

template <int D>
kernel void paged_gqa_decode(const device half* q [[buffer(0)]],
                             const device half* k_cache [[buffer(1)]],
                             const device half* v_cache [[buffer(2)]],
                             const device int* block_table [[buffer(3)]],
                             const device int* context_lens [[buffer(4)]],
                             device half* out [[buffer(5)]],
                             constant PagedAttentionParams& p [[buffer(6)]],
                             uint3 group_pos [[threadgroup_position_in_grid]],
                             ushort sg [[simdgroup_index_in_threadgroup]],
                             ushort lane [[thread_index_in_simdgroup]]) {
  static_assert(D % 32 == 0, "each lane owns D / 32 consecutive elements of a row");
  constexpr int PER_LANE = D / 32;
  constexpr int HEADS = GQA_DECODE_HEADS;
  constexpr int SIMDGROUPS = GQA_DECODE_SIMDGROUPS;
  threadgroup float sg_stats[SIMDGROUPS * HEADS * 2];  // per simdgroup and head: (max, sum)
  threadgroup float sg_out[SIMDGROUPS * D];            // one head's rescaled outputs, per simdgroup

  const uint group = p.num_heads / p.num_kv_heads;
  const uint kv_head = group_pos.y, seq = group_pos.z;
  const uint first_head = kv_head * group + group_pos.x * HEADS;
  const uint heads_here = min(uint(HEADS), group - group_pos.x * HEADS);
  const uint context = uint(max(context_lens[seq], 0));
  const float scale_log2 = log2_scale(p.scale);

  // Heads past the group's end get a zero query; their results are never stored.
  float query[HEADS][PER_LANE], acc[HEADS][PER_LANE], row_maximum[HEADS], row_total[HEADS];
  for (int h = 0; h < HEADS; ++h) {
    const device half* qh = q + (ulong(seq) * p.num_heads + first_head + h) * D + lane * PER_LANE;
    for (int i = 0; i < PER_LANE; ++i) {
      query[h][i] = uint(h) < heads_here ? float(qh[i]) * scale_log2 : 0.0f;
      acc[h][i] = 0.0f;
    }
    row_maximum[h] = kNoScore;
    row_total[h] = 0.0f;
  }

  const device int* table = block_table + ulong(seq) * p.max_blocks;
  const uint blocks = (context + p.block_size - 1) / p.block_size;
  const ulong position_stride = ulong(p.num_kv_heads) * D;
  for (uint b = sg; b < blocks; b += SIMDGROUPS) {
    const ulong block_start = (ulong(table[b]) * p.block_size * p.num_kv_heads + kv_head) * D + lane * PER_LANE;
    const uint positions = min(p.block_size, context - b * p.block_size);
    for (uint t = 0; t < positions; ++t) {
      const device half* k_row = k_cache + block_start + t * position_stride;
      const device half* v_row = v_cache + block_start + t * position_stride;
      float key[PER_LANE], value[PER_LANE];
      for (int i = 0; i < PER_LANE; ++i) {
        key[i] = float(k_row[i]);
        value[i] = float(v_row[i]);
      }
      for (int h = 0; h < HEADS; ++h) {
        float dot = 0.0f;
        for (int i = 0; i < PER_LANE; ++i) {
          dot = fma(query[h][i], key[i], dot);
        }
        const float score = simd_sum(dot);
        const float new_max = max(row_maximum[h], score);
        const float rescale = exp2(row_maximum[h] - new_max);
        const float prob = exp2(score - new_max);
        row_total[h] = row_total[h] * rescale + prob;
        for (int i = 0; i < PER_LANE; ++i) {
          acc[h][i] = fma(prob, value[i], acc[h][i] * rescale);
        }
        row_maximum[h] = new_max;
      }
    }
  }

  // Merge the simdgroups: each rescales its partial output to the common maximum, then the
  // threadgroup sums them one head at a time.
  if (lane == 0) {
    for (int h = 0; h < HEADS; ++h) {
      sg_stats[(sg * HEADS + h) * 2] = row_maximum[h];
      sg_stats[(sg * HEADS + h) * 2 + 1] = row_total[h];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint tid = sg * 32 + lane;
  for (int h = 0; h < HEADS; ++h) {
    float common_max = kNoScore;
    for (int s = 0; s < SIMDGROUPS; ++s) {
      common_max = max(common_max, sg_stats[(s * HEADS + h) * 2]);
    }
    float total = 0.0f;
    for (int s = 0; s < SIMDGROUPS; ++s) {
      total += sg_stats[(s * HEADS + h) * 2 + 1] * exp2(sg_stats[(s * HEADS + h) * 2] - common_max);
    }
    const float weight = exp2(row_maximum[h] - common_max);
    for (int i = 0; i < PER_LANE; ++i) {
      sg_out[sg * D + lane * PER_LANE + i] = acc[h][i] * weight;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < uint(D) && uint(h) < heads_here) {
      float sum = 0.0f;
      for (int s = 0; s < SIMDGROUPS; ++s) {
        sum += sg_out[s * D + tid];
      }
      out[(ulong(seq) * p.num_heads + first_head + h) * D + tid] = half(total > 0.0f ? sum / total : 0.0f);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// ---- paged MLA decode (absorbed form) -----------------------------------------------------------

template <int RANK, int ROPE>
kernel void paged_mla_decode(const device half* q_latent [[buffer(0)]],
                             const device half* q_rope [[buffer(1)]],
                             const device half* cache [[buffer(2)]],
                             const device int* block_table [[buffer(3)]],
                             const device int* context_lens [[buffer(4)]],
                             device half* out [[buffer(5)]],
                             constant PagedMLAParams& p [[buffer(6)]],
                             uint3 group_pos [[threadgroup_position_in_grid]],
                             ushort sg [[simdgroup_index_in_threadgroup]],
                             ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int SIMDGROUPS = MLA_DECODE_SIMDGROUPS;
  constexpr int THREADS = MLA_DECODE_THREADS;
  constexpr int ROWS = 8;  // MLA_DECODE_HEADS query rows, then MLA_DECODE_TOKENS cache positions
  static_assert(MLA_DECODE_HEADS == ROWS && MLA_DECODE_TOKENS == ROWS, "one 8x8 score block per step");
  static_assert(RANK % (8 * SIMDGROUPS) == 0 && ROPE % 8 == 0, "8-wide fragments, latent columns split 4 ways");
  constexpr int DEPTH = RANK + ROPE;
  constexpr int LD = DEPTH + 8;  // padded row stride: transposed fragment loads hit distinct banks
  constexpr int DEPTH_STEPS = DEPTH / 8;
  constexpr int STEPS_PER_SG = (DEPTH_STEPS + SIMDGROUPS - 1) / SIMDGROUPS;
  constexpr int COLS_PER_SG = RANK / 8 / SIMDGROUPS;
  constexpr int CHUNKS = ROWS * DEPTH / 4;  // half4 chunks of the staged rows
  threadgroup half rows[ROWS * LD];
  threadgroup float partial_scores[SIMDGROUPS * 64];

  const uint head0 = group_pos.x * ROWS, seq = group_pos.y;
  const uint tid = sg * 32 + lane;
  const uint context = uint(max(context_lens[seq], 0));

  // The 8 heads' queries [q_latent | q_rope] as rows (zero past num_heads); each simdgroup keeps the
  // depth steps sg, sg + 4, ... of them as half fragments.
  for (uint i = tid; i < uint(CHUNKS); i += THREADS) {
    const uint r = i / (DEPTH / 4), c = (i % (DEPTH / 4)) * 4;
    const uint head = head0 + r;
    half4 chunk = half4(0.0h);
    if (head < p.num_heads) {
      const ulong qi = ulong(seq) * p.num_heads + head;
      chunk = c < uint(RANK) ? *reinterpret_cast<const device half4*>(q_latent + qi * RANK + c)
                             : *reinterpret_cast<const device half4*>(q_rope + qi * ROPE + (c - RANK));
    }
    *reinterpret_cast<threadgroup half4*>(rows + r * LD + c) = chunk;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_half8x8 query[STEPS_PER_SG];
  for (int j = 0; j < STEPS_PER_SG; ++j) {
    const int step = sg + j * SIMDGROUPS;
    if (step < DEPTH_STEPS) {
      simdgroup_load(query[j], rows + 8 * step, LD);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  simdgroup_float8x8 acc[COLS_PER_SG];
  for (int j = 0; j < COLS_PER_SG; ++j) {
    acc[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  float row_maximum = kNoScore, lane_sum = 0.0f;
  const float scale_log2 = log2_scale(p.scale);
  const device int* table = block_table + ulong(seq) * p.max_blocks;
  const uint first_col = sg * COLS_PER_SG * 8;

  for (uint t0 = 0; t0 < context; t0 += ROWS) {
    // Gather 8 positions through the block table; rows past the context are zero.
    for (uint i = tid; i < uint(CHUNKS); i += THREADS) {
      const uint r = i / (DEPTH / 4), c = (i % (DEPTH / 4)) * 4;
      const uint pos = t0 + r;
      half4 chunk = half4(0.0h);
      if (pos < context) {
        const ulong slot = ulong(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
        chunk = *reinterpret_cast<const device half4*>(cache + slot * DEPTH + c);
      }
      *reinterpret_cast<threadgroup half4*>(rows + r * LD + c) = chunk;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Scores [head, position] over this simdgroup's depth steps; K^T fragments are transposed loads.
    simdgroup_float8x8 scores = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (int j = 0; j < STEPS_PER_SG; ++j) {
      const int step = sg + j * SIMDGROUPS;
      if (step < DEPTH_STEPS) {
        simdgroup_half8x8 key;
        simdgroup_load(key, rows + 8 * step, LD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(scores, query[j], key, scores);
      }
    }
    simdgroup_store(scores, partial_scores + sg * 64, 8);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Every simdgroup adds the partials in the same order, so all hold identical probabilities.
    simdgroup_load(scores, partial_scores, 8);
    for (int s = 1; s < SIMDGROUPS; ++s) {
      simdgroup_float8x8 part;
      simdgroup_load(part, partial_scores + s * 64, 8);
      scores.thread_elements()[0] += part.thread_elements()[0];
      scores.thread_elements()[1] += part.thread_elements()[1];
    }
    online_softmax_step<1, COLS_PER_SG>(&scores, acc, row_maximum, lane_sum, scale_log2, t0, context, lane);
    for (int j = 0; j < COLS_PER_SG; ++j) {
      simdgroup_half8x8 latent;
      simdgroup_load(latent, rows + first_col + 8 * j, LD);
      simdgroup_multiply_accumulate(acc[j], scores, latent, acc[j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  const float total = row_sum(lane_sum);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  const uint head = head0 + frag_row(lane);
  if (head < p.num_heads) {
    device half* dst = out + (ulong(seq) * p.num_heads + head) * RANK + first_col + frag_col(lane);
    for (int j = 0; j < COLS_PER_SG; ++j) {
      dst[8 * j] = half(acc[j].thread_elements()[0] * inv_total);
      dst[8 * j + 1] = half(acc[j].thread_elements()[1] * inv_total);
    }
  }
}

// ---- causal flash attention for prefill ---------------------------------------------------------

template <int D>
kernel void flash_prefill(const device half* q [[buffer(0)]],
                          const device half* k [[buffer(1)]],
                          const device half* v [[buffer(2)]],
                          device half* out [[buffer(3)]],
                          constant FlashAttentionParams& p [[buffer(4)]],
                          uint3 group_pos [[threadgroup_position_in_grid]],
                          ushort sg [[simdgroup_index_in_threadgroup]],
                          ushort lane [[thread_index_in_simdgroup]]) {
  static_assert(D % 8 == 0, "8-wide fragments");
  constexpr int BQ = FLASH_PREFILL_BQ;
  constexpr int THREADS = FLASH_PREFILL_THREADS;
  constexpr int BK = D >= 128 ? 16 : 32;  // keeps the K/V stage near 8 KiB
  constexpr int LD = D + 8;               // padded row stride: transposed K loads hit distinct banks
  constexpr int D_STEPS = D / 8;
  constexpr int KEY_TILES = BK / 8;
  constexpr int STAGE = BQ * LD > 2 * BK * LD ? BQ * LD : 2 * BK * LD;
  threadgroup half stage[STAGE];  // the query tile, then each step's K and V tiles
  threadgroup half* k_tile = stage;
  threadgroup half* v_tile = stage + BK * LD;

  const uint q0 = group_pos.x * BQ, head = group_pos.y, seq = group_pos.z;
  const uint kv_head = head / (p.num_heads / p.num_kv_heads);
  const uint tid = sg * 32 + lane;
  const ulong q_stride = ulong(p.num_heads) * D, kv_stride = ulong(p.num_kv_heads) * D;
  const device half* q_seq = q + ulong(seq) * p.q_len * q_stride + head * D;
  const device half* k_seq = k + ulong(seq) * p.kv_len * kv_stride + kv_head * D;
  const device half* v_seq = v + ulong(seq) * p.kv_len * kv_stride + kv_head * D;

  for (uint i = tid; i < uint(BQ * D / 4); i += THREADS) {
    const uint r = i / (D / 4), c = (i % (D / 4)) * 4;
    const half4 chunk = q0 + r < p.q_len ? *reinterpret_cast<const device half4*>(q_seq + (q0 + r) * q_stride + c)
                                         : half4(0.0h);
    *reinterpret_cast<threadgroup half4*>(stage + r * LD + c) = chunk;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_half8x8 query[D_STEPS];
  for (int d = 0; d < D_STEPS; ++d) {
    simdgroup_load(query[d], stage + 8 * sg * LD + 8 * d, LD);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  simdgroup_float8x8 acc[D_STEPS];
  for (int d = 0; d < D_STEPS; ++d) {
    acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  float row_maximum = kNoScore, lane_sum = 0.0f;
  const float scale_log2 = log2_scale(p.scale);
  const uint row_q = q0 + 8 * sg + frag_row(lane);
  const uint key_end = min(p.kv_len, p.causal_offset + row_q + 1);  // keys this lane's row sees
  const uint last_q = min(q0 + BQ, p.q_len) - 1;
  const uint tile_end = min(p.kv_len, p.causal_offset + last_q + 1);

  for (uint k0 = 0; k0 < tile_end; k0 += BK) {
    for (uint i = tid; i < uint(BK * D / 4); i += THREADS) {
      const uint r = i / (D / 4), c = (i % (D / 4)) * 4;
      const uint pos = k0 + r;
      half4 key = half4(0.0h), value = half4(0.0h);
      if (pos < p.kv_len) {
        key = *reinterpret_cast<const device half4*>(k_seq + pos * kv_stride + c);
        value = *reinterpret_cast<const device half4*>(v_seq + pos * kv_stride + c);
      }
      *reinterpret_cast<threadgroup half4*>(k_tile + r * LD + c) = key;
      *reinterpret_cast<threadgroup half4*>(v_tile + r * LD + c) = value;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_float8x8 scores[KEY_TILES];
    for (int j = 0; j < KEY_TILES; ++j) {
      scores[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int d = 0; d < D_STEPS; ++d) {
        simdgroup_half8x8 key_t;
        simdgroup_load(key_t, k_tile + 8 * j * LD + 8 * d, LD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(scores[j], query[d], key_t, scores[j]);
      }
    }
    online_softmax_step<KEY_TILES, D_STEPS>(scores, acc, row_maximum, lane_sum, scale_log2, k0, key_end, lane);
    for (int j = 0; j < KEY_TILES; ++j) {
      for (int d = 0; d < D_STEPS; ++d) {
        simdgroup_half8x8 value;
        simdgroup_load(value, v_tile + 8 * j * LD + 8 * d, LD);
        simdgroup_multiply_accumulate(acc[d], scores[j], value, acc[d]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  const float total = row_sum(lane_sum);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  if (row_q < p.q_len) {
    device half* dst = out + (ulong(seq) * p.q_len + row_q) * q_stride + head * D + frag_col(lane);
    for (int d = 0; d < D_STEPS; ++d) {
      dst[8 * d] = half(acc[d].thread_elements()[0] * inv_total);
      dst[8 * d + 1] = half(acc[d].thread_elements()[1] * inv_total);
    }
  }
}

// ---- instantiations -----------------------------------------------------------------------------

// Variadic: template arguments contain commas.
#define INSTANTIATE(name, ...) template [[host_name(name)]] [[kernel]] decltype(__VA_ARGS__) __VA_ARGS__;

INSTANTIATE("paged_gqa_decode_d64", paged_gqa_decode<64>)
INSTANTIATE("paged_gqa_decode_d128", paged_gqa_decode<128>)
INSTANTIATE("paged_mla_decode_r512_p64", paged_mla_decode<512, 64>)  // GLM-4.7-Flash, DeepSeek-V3
INSTANTIATE("paged_mla_decode_r64_p16", paged_mla_decode<64, 16>)    // small models and tests
INSTANTIATE("flash_prefill_d64", flash_prefill<64>)
INSTANTIATE("flash_prefill_d128", flash_prefill<128>)
