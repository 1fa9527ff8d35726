// attention.h: what the host and the kernels of attention.metal agree on: the parameter structs, the
// buffer order and the launch geometry.
//
// Paged caches: the cache is a pool of fixed-size blocks; block_table[seq, i] (int32, row stride
// max_blocks) names the pool block holding positions i*block_size .. (i+1)*block_size - 1 of sequence
// seq, and context_lens[seq] (int32) is the number of valid positions. Only the first
// ceil(context_len / block_size) table entries of a row are read, and no position >= context_len is
// read: the tail of the last block may hold anything (even NaN). A context length of 0 gives zeros.
//
// paged_gqa_decode_d{64,128}: one query token per sequence, num_heads = group * num_kv_heads, query
//   head h reads kv head h / group (torch's enable_gqa order).
//   Buffers: 0 q [batch, num_heads, D] half, 1 k_cache, 2 v_cache [num_blocks, block_size, num_kv_heads, D]
//   half, 3 block_table, 4 context_lens, 5 out [batch, num_heads, D] half, 6 PagedAttentionParams.
//   Launch: grid (ceil(group / GQA_DECODE_HEADS), num_kv_heads, batch), GQA_DECODE_THREADS threads.
//
// paged_mla_decode_r{RANK}_p{ROPE}: MLA in absorbed form over the latent cache, one query per sequence.
//   Buffers: 0 q_latent [batch, num_heads, RANK] half, 1 q_rope [batch, num_heads, ROPE] half,
//   2 cache [num_blocks, block_size, RANK + ROPE] half (per token the normed latent, then the rotated
//   shared key, as MLACache stores them), 3 block_table, 4 context_lens, 5 out [batch, num_heads, RANK]
//   half (the softmax-weighted latent; W_uv is applied by the caller), 6 PagedMLAParams.
//   Launch: grid (ceil(num_heads / MLA_DECODE_HEADS), batch), MLA_DECODE_THREADS threads.
//
// flash_prefill_d{64,128}: causal attention of q_len new queries over kv_len keys of the same
//   sequence; query i sits at position causal_offset + i and sees keys 0 .. causal_offset + i
//   (and < kv_len). causal_offset = kv_len - q_len when the queries continue a cached prefix.
//   Buffers: 0 q [batch, q_len, num_heads, D] half, 1 k, 2 v [batch, kv_len, num_kv_heads, D] half,
//   3 out [batch, q_len, num_heads, D] half, 4 FlashAttentionParams.
//   Launch: grid (ceil(q_len / FLASH_PREFILL_BQ), num_heads, batch), FLASH_PREFILL_THREADS threads.

#pragma once

struct PagedAttentionParams {
  uint num_heads;     // query heads, a multiple of num_kv_heads
  uint num_kv_heads;
  uint block_size;    // positions per cache block (any value >= 1; 16 or 32 in practice)
  uint max_blocks;    // row stride of block_table
  float scale;        // softmax scale (head_dim^-0.5 for plain attention)
};

struct PagedMLAParams {
  uint num_heads;
  uint block_size;    // positions per cache block (any value >= 1)
  uint max_blocks;    // row stride of block_table
  float scale;        // softmax scale of the absorbed scores (MLAAttention.scaling)
};

struct FlashAttentionParams {
  uint q_len;
  uint kv_len;
  uint num_heads;      // a multiple of num_kv_heads
  uint num_kv_heads;
  uint causal_offset;  // position of query 0 among the keys
  float scale;
};

enum : uint {
  GQA_DECODE_HEADS = 4,         // query heads of one kv group per threadgroup (they share each K/V read)
  GQA_DECODE_SIMDGROUPS = 8,    // they take the sequence's blocks round-robin
  GQA_DECODE_THREADS = 256,
  MLA_DECODE_HEADS = 8,         // query heads per threadgroup: the rows of one 8x8 simdgroup matrix
  MLA_DECODE_SIMDGROUPS = 4,    // they split the score depth, then the latent columns of the output
  MLA_DECODE_THREADS = 128,
  MLA_DECODE_TOKENS = 8,        // cache positions per step: the columns of the score matrix
  FLASH_PREFILL_BQ = 32,        // queries per threadgroup: 8 rows per simdgroup
  FLASH_PREFILL_THREADS = 128,
};
