// The fused decode step of a dense GQA decoder stack (llama, qwen2, qwen3): every layer of one token
// per sequence in C++, with no Python between the layers. Per layer: RMSNorm, q/k/v (one pass over
// their rows), optional per-head q/k RMSNorm, RoPE, the KV-cache write, attention over the cache,
// o_proj + residual, RMSNorm, gate/up with SiLU, down_proj + residual. The matrices run through the
// row-range GEMV of gemv.h, their rows split over the threads; the scratch is allocated once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/quantized_matrix.h"
#include "common/trellis.h"
#include "cpu/gemv.h"
#include "cpu/kernels.h"

namespace metal_marlin::cpu {

// A trellis-coded matrix (docs/formats.md): W = diag(sv) H_out Q H_in diag(su).
struct TrellisMatrix {
  const uint32_t* packed = nullptr;  // [n/16, k/16, 8*bits]
  const uint16_t* su = nullptr;      // float16 [k]
  const uint16_t* sv = nullptr;      // float16 [n]
  int64_t n = 0, k = 0;
  int bits = 0;
  trellis::Codebook codebook{};
  int64_t had_in = 0, had_out = 0;   // Hadamard block sizes
};

// One projection: group-quantized (`w`) or trellis-coded (`trellis.packed` set).
struct DecoderLinear {
  QuantizedMatrix w{};
  TrellisMatrix trellis{};
  const float* bias = nullptr;  // [rows()] or nullptr

  bool is_trellis() const { return trellis.packed != nullptr; }
  int64_t rows() const { return is_trellis() ? trellis.n : w.n; }
  // Row ranges handed to threads start at multiples of this: for trellis, whole 16-row tiles and
  // whole output Hadamard blocks (both powers of two).
  int64_t row_granularity() const { return is_trellis() ? std::max<int64_t>(16, trellis.had_out) : 1; }
};

// What a linear reads: the GEMV activations of gemv.h, or for a trellis linear H_in(su * x).
struct LinearInput {
  const GemvActivations* gemv = nullptr;
  const float* rotated = nullptr;  // [m, k]
  int64_t m = 0;
};

struct DecoderLayerWeights {
  const float* input_norm;  // [hidden]
  const float* post_norm;   // [hidden]
  const float* q_norm;      // [head_dim] or nullptr (qwen3 only)
  const float* k_norm;
  DecoderLinear q, k, v, o, gate, up, down;
};

struct DecoderShape {
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  float eps;
};

// Where a layer's cached key/value rows live: a contiguous cache ([layers, batch, kv_heads, max_len,
// head_dim], models/cache.py KVCache) or a paged one ([layers, num_blocks, block_size, kv_heads,
// head_dim] with a block table per sequence, models/paged_cache.py).
struct KVLayout {
  float* keys;
  float* values;
  int64_t max_len;              // contiguous: positions per sequence; paged: table_width * block_size
  const int32_t* block_table;   // paged: [batch, table_width] block ids; nullptr: contiguous
  int64_t table_width = 0, block_size = 0, num_blocks = 0;

  // Offset (in floats) of the row of (layer, sequence b, kv head h, position s).
  int64_t row(int64_t layer, int64_t b, int64_t batch, int64_t kv_heads, int64_t h, int64_t s, int64_t hd) const {
    if (!block_table) return (((layer * batch + b) * kv_heads + h) * max_len + s) * hd;
    const int64_t block = block_table[b * table_width + s / block_size];
    return (((layer * num_blocks + block) * block_size + s % block_size) * kv_heads + h) * hd;
  }
  // Floats between the rows of consecutive positions within a block (a contiguous cache: one block).
  int64_t position_stride(int64_t kv_heads, int64_t hd) const { return block_table ? kv_heads * hd : hd; }
};

// One step's inputs: `batch` sequences, one new token each; sequence b's token goes to position
// positions[b] and attends to the cached positions before it (those key_mask allows, if given) and itself.
struct DecodeStepArgs {
  float* hidden;             // [batch, hidden]: the embeddings in, the last layer's output out
  const float* cos;          // [batch, head_dim] rotary tables of the new tokens
  const float* sin;
  KVLayout cache;
  const int32_t* positions;  // [batch]
  const uint8_t* key_mask;   // [batch, cache.max_len] (bool) or nullptr: every earlier position is real
  int64_t batch;
  float scaling;             // softmax scale
  int n_threads;
  // If not null, seconds spent per phase are added to it: [0] q/k/v, [1] attention (norms, RoPE, cache
  // write, softmax), [2] o_proj, [3] gate/up + SiLU, [4] down_proj (benchmarks/llamacpp.py --profile).
  double* phase_seconds = nullptr;
};
inline constexpr int kDecodePhases = 5;

class DecoderStack {
 public:
  explicit DecoderStack(const DecoderShape& shape) : shape_(shape) {}
  void add_layer(const DecoderLayerWeights& layer) { layers_.push_back(layer); }
  int64_t n_layers() const { return int64_t(layers_.size()); }
  const DecoderShape& shape() const { return shape_; }

  // Runs every layer. batch <= kMaxBatch.
  void decode(const DecodeStepArgs& args);
  static constexpr int64_t kMaxBatch = 8;

 private:
  void run_layer(const DecoderLayerWeights& layer, int64_t index, const DecodeStepArgs& args);
  void rms_norm(const float* x, const float* weight, int64_t rows, float* out) const;
  void attend(const DecodeStepArgs& args, int64_t layer, int64_t b, int64_t head, float* scores);

  DecoderShape shape_;
  std::vector<DecoderLayerWeights> layers_;
  // Scratch, sized on the first step.
  AlignedFloats normed_, q_, k_, v_, attn_, proj_, act_, gate_up_;
  std::vector<AlignedFloats> scores_;  // per thread: [max_len]
  // Inputs of the projections: slots per input (q/k/v, o, gate/up, down), for linears of different
  // formats reading the same activations.
  GemvActivations qkv_in_[3], o_in_[1], mlp_in_[2], down_in_[1];
  AlignedFloats qkv_rotated_[3], o_rotated_[1], mlp_rotated_[2], down_rotated_[1];
};

}  // namespace metal_marlin::cpu
