// The fused MoE experts kernel (SwiGLU experts with group-quantized stacked weights):
//   out[t] = sum over slots s with e = index[t, s] < E of
//            weights[t, s] * down[e] @ (silu(gate) * up),   [gate, up] = gate_up[e] @ hidden[t]
// in float32, converted to the activations' dtype at the end. index == E marks a slot to ignore.
#pragma once

#include <cstdint>

#include "common/dtypes.h"
#include "common/quantized_matrix.h"

namespace metal_marlin::cpu {

struct MoeExpertsArgs {
  // Expert 0's matrices; expert e's tensors follow expert 0's, each expert the same size
  // (stacked [E, N, ...] tensors). gate_up: [2I, H] (gate rows first, then up); down: [H, I].
  QuantizedMatrix gate_up;
  QuantizedMatrix down;
  int64_t n_experts;           // E
  const void* hidden;          // [tokens, H] of `dtype`
  DType dtype;                 // of hidden and out
  int64_t tokens;
  int64_t top_k;
  const int64_t* top_k_index;  // [tokens, top_k], each in [0, E]
  const float* top_k_weights;  // [tokens, top_k]
  void* out;                   // [tokens, H] of `dtype`; every element is written
  int n_threads;               // >= 1
};

// Throws std::invalid_argument, before writing anything, if an index is outside [0, E]. The result
// does not depend on n_threads or the SIMD path's threading: each token sums its slots in a fixed order.
void moe_experts(const MoeExpertsArgs& args);

}  // namespace metal_marlin::cpu
