// The fused MoE experts kernel (cpu/moe_experts.h).
//
// The (token, slot) pairs are counting-sorted by expert (stable, so each expert's pairs stay in token
// order). For each active expert, in expert order, its rows are gathered as float32 and run through
// the quantized matmul kernel (cpu/kernels.h: the SIMD path in effect, on the thread pool) for gate_up,
// silu(gate) * up is applied in float32, then the down matmul; weight * result is added to the token's
// float32 accumulator row. Each token therefore sums its slots in ascending expert order whatever the
// thread count. An expert with more rows than one chunk runs in chunks, so scratch stays bounded for
// long prefills; all scratch is sized once per call.
#include "cpu/moe_experts.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu {
namespace {

// Rows per matmul call: two of the GEMM's 120-row blocks (it decodes W once per block anyway).
constexpr int64_t kMaxChunkRows = 240;

// Expert `e` of stacked matrices whose expert 0 is `first`.
QuantizedMatrix expert_matrix(const QuantizedMatrix& first, int64_t e) {
  QuantizedMatrix w = first;
  const int64_t scale_count = first.n * first.groups_per_row();
  w.packed += e * first.n * first.words_per_row();
  w.scales += e * scale_count;
  if (w.offsets) w.offsets += e * scale_count;
  return w;
}

// first[e] .. first[e + 1]: expert e's pairs in `order` (e == E: the ignored slots, never read).
struct ExpertSlices {
  std::vector<int64_t> first;  // [E + 2]
  std::vector<int64_t> order;  // pair indices t * top_k + s of the active pairs, grouped by expert
  int64_t max_rows = 0;        // the most pairs any active expert has
};

ExpertSlices sort_pairs_by_expert(const MoeExpertsArgs& args) {
  const int64_t n_pairs = args.tokens * args.top_k;
  ExpertSlices slices;
  slices.first.assign(size_t(args.n_experts + 2), 0);
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t e = args.top_k_index[p];
    if (e < 0 || e > args.n_experts) {
      throw std::invalid_argument("moe_experts: top_k_index[" + std::to_string(p / args.top_k) + ", " +
                                  std::to_string(p % args.top_k) + "] = " + std::to_string(e) +
                                  " is out of range: expected 0.." + std::to_string(args.n_experts) + " (" +
                                  std::to_string(args.n_experts) + " = num_experts marks a slot to ignore)");
    }
    ++slices.first[size_t(e + 1)];
  }
  for (int64_t e = 0; e < args.n_experts; ++e) slices.max_rows = std::max(slices.max_rows, slices.first[size_t(e + 1)]);
  for (size_t e = 1; e < slices.first.size(); ++e) slices.first[e] += slices.first[e - 1];
  slices.order.resize(size_t(slices.first[size_t(args.n_experts)]));
  std::vector<int64_t> next(slices.first.begin(), slices.first.begin() + args.n_experts);
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t e = args.top_k_index[p];
    if (e < args.n_experts) slices.order[size_t(next[size_t(e)]++)] = p;
  }
  return slices;
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

void moe_experts(const MoeExpertsArgs& args) {
  const ExpertSlices slices = sort_pairs_by_expert(args);  // checks every index first
  const int64_t hidden = args.down.n;
  const int64_t inter = args.down.k;
  const size_t in_row_bytes = size_t(hidden) * dtype_size(args.dtype);

  // float32 output is its own accumulator; float16/bfloat16 accumulate in float32 and convert at the end.
  std::vector<float> acc_storage;
  float* acc = static_cast<float*>(args.out);
  if (args.dtype != DType::kFloat32) {
    acc_storage.resize(size_t(args.tokens * hidden));
    acc = acc_storage.data();
  }
  std::fill_n(acc, args.tokens * hidden, 0.0f);

  const int64_t chunk = std::min(slices.max_rows, kMaxChunkRows);
  AlignedFloats rows(chunk * hidden);         // gathered activations, then the down outputs
  AlignedFloats gate_up(chunk * 2 * inter);
  AlignedFloats act(chunk * inter);

  for (int64_t e = 0; e < args.n_experts; ++e) {
    const QuantizedMatrix w_gate_up = expert_matrix(args.gate_up, e);
    const QuantizedMatrix w_down = expert_matrix(args.down, e);
    for (int64_t begin = slices.first[size_t(e)]; begin < slices.first[size_t(e + 1)]; begin += chunk) {
      const int64_t m = std::min(chunk, slices.first[size_t(e + 1)] - begin);
      const int64_t* pairs = slices.order.data() + begin;
      for (int64_t r = 0; r < m; ++r) {
        const int64_t token = pairs[r] / args.top_k;
        convert_to_float(static_cast<const char*>(args.hidden) + size_t(token) * in_row_bytes, args.dtype, hidden,
                         rows.data() + r * hidden);
      }
      quant_matmul_float_activations({w_gate_up, rows.data(), DType::kFloat32, m, nullptr, gate_up.data(), args.n_threads});
      parallel_for(plan_threads(args.n_threads, m), m, [&](int64_t r, int) {
        const float* gate = gate_up.data() + r * 2 * inter;
        const float* up = gate + inter;
        float* out = act.data() + r * inter;
        for (int64_t j = 0; j < inter; ++j) out[j] = silu(gate[j]) * up[j];
      });
      quant_matmul_float_activations({w_down, act.data(), DType::kFloat32, m, nullptr, rows.data(), args.n_threads});
      for (int64_t r = 0; r < m; ++r) {
        const float weight = args.top_k_weights[pairs[r]];
        const float* y = rows.data() + r * hidden;
        float* dst = acc + (pairs[r] / args.top_k) * hidden;
        for (int64_t h = 0; h < hidden; ++h) dst[h] += weight * y[h];
      }
    }
  }

  if (args.dtype != DType::kFloat32) convert_from_float(acc, args.tokens * hidden, args.dtype, args.out);
}

}  // namespace metal_marlin::cpu
