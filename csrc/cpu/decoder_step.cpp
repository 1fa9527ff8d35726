#include "cpu/decoder_step.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/simd.h"
#include "cpu/thread_pool.h"
#include "cpu/trellis_kernels.h"

namespace metal_marlin::cpu {
namespace {

constexpr int64_t kRowsPerTask = 64;

// The two vector loops of attention (head_dim long), AVX-512 when the path in effect allows.
#if METAL_MARLIN_X86
METAL_MARLIN_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

METAL_MARLIN_AVX512 void axpy_avx512(float alpha, const float* x, int64_t n, float* y) {
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}
#endif

// The cached rows of one (layer, sequence, kv head): position s at base + offset(s).
struct CachedRows {
  const float* keys;
  const float* values;
  const KVLayout* layout;
  int64_t layer, b, batch, kv_heads, h, hd;
  int64_t offset(int64_t s) const { return layout->row(layer, b, batch, kv_heads, h, s, hd); }
};

#if METAL_MARLIN_X86
// Attention of one query head with head_dim = 16 * C, the output accumulated in registers.
template <int C>
METAL_MARLIN_AVX512 void attend_head_avx512(const float* q, const CachedRows& rows, const uint8_t* mask,
                                            int64_t start, const float* k_new, const float* v_new, float scaling,
                                            float* scores, float* out) {
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scaling));
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < start; ++s) {
    if (mask && !mask[s]) continue;
    const float* k = rows.keys + rows.offset(s);
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
    for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), acc);
    scores[s] = _mm512_reduce_add_ps(acc);
    max_score = std::max(max_score, scores[s]);
  }
  __m512 own_acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k_new));
  for (int c = 1; c < C; ++c) own_acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k_new + 16 * c), own_acc);
  const float own = _mm512_reduce_add_ps(own_acc);
  max_score = std::max(max_score, own);
  __m512 acc[C];
  const float p_own = std::exp(own - max_score);
  float total = p_own;
  for (int c = 0; c < C; ++c) acc[c] = _mm512_mul_ps(_mm512_set1_ps(p_own), _mm512_loadu_ps(v_new + 16 * c));
  for (int64_t s = 0; s < start; ++s) {
    if (mask && !mask[s]) continue;
    const float p = std::exp(scores[s] - max_score);
    total += p;
    const __m512 pv = _mm512_set1_ps(p);
    const float* v = rows.values + rows.offset(s);
    for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 16 * c), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / total);
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}
#endif

bool vector_loops_avx512() {
#if METAL_MARLIN_X86
  return current_simd_level() >= SimdLevel::kAvx512;
#else
  return false;
#endif
}

float dot(const float* a, const float* b, int64_t n, bool avx512) {
#if METAL_MARLIN_X86
  if (avx512) return dot_avx512(a, b, n);
#endif
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy(float alpha, const float* x, int64_t n, float* y, bool avx512) {
#if METAL_MARLIN_X86
  if (avx512) return axpy_avx512(alpha, x, n, y);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// x (one head, in place): optional RMSNorm with `norm` weights, then RoPE with the two halves as the
// rotated pairs (models/layers.py: rotate_half_pairs).
void norm_and_rotate(float* x, int64_t dim, const float* norm, float eps, const float* cos, const float* sin) {
  if (norm) {
    float sum = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(sum / float(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) x[i] = norm[i] * (x[i] * inv);
  }
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// The inputs of linears that all read x [m, k]: GEMV activations prepared once per distinct (format,
// group size) of the group-quantized ones, H_in(su * x) for each trellis one.
template <size_t N>
std::array<LinearInput, N> prepare_inputs(const std::array<const DecoderLinear*, N>& linears, const float* x,
                                          int64_t m, GemvActivations* slots, AlignedFloats* rotated) {
  std::array<LinearInput, N> inputs{};
  for (size_t i = 0; i < N; ++i) {
    const DecoderLinear& l = *linears[i];
    inputs[i].m = m;
    if (l.is_trellis()) {
      const TrellisMatrix& t = l.trellis;
      rotated[i].reserve_zeroed(m * t.k);
      float* r = rotated[i].data();
      for (int64_t row = 0; row < m; ++row) {
        for (int64_t j = 0; j < t.k; ++j) r[row * t.k + j] = x[row * t.k + j] * half_to_float(t.su[j]);
      }
      trellis_cpu::hadamard(r, r, m, t.k, t.had_in, 1);
      inputs[i].rotated = r;
      continue;
    }
    for (size_t j = 0; j < i && !inputs[i].gemv; ++j) {
      const DecoderLinear& o = *linears[j];
      if (!o.is_trellis() && o.w.format == l.w.format && o.w.group_size == l.w.group_size) inputs[i].gemv = inputs[j].gemv;
    }
    if (!inputs[i].gemv) {
      prepare_gemv(l.w, x, m, slots[i]);
      inputs[i].gemv = &slots[i];
    }
  }
  return inputs;
}

// Adds the time since the last mark to phase `i` of `seconds` (if given).
class PhaseClock {
 public:
  explicit PhaseClock(double* seconds) : seconds_(seconds), last_(seconds ? now() : 0.0) {}
  void mark(int phase) {
    if (!seconds_) return;
    const double t = now();
    seconds_[phase] += t - last_;
    last_ = t;
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  double* seconds_;
  double last_;
};

// Row ranges of a linear handed to threads: about kRowsPerTask rows, starting at multiples of its
// granularity.
int64_t task_rows(const DecoderLinear& l) {
  const int64_t g = l.row_granularity();
  return (kRowsPerTask + g - 1) / g * g;
}
int64_t row_tasks(const DecoderLinear& l) { return (l.rows() + task_rows(l) - 1) / task_rows(l); }

// Rows [begin, end) of `linear` for all activation rows into out [m, rows], plus the bias.
void linear_rows(const DecoderLinear& linear, const LinearInput& x, int64_t begin, int64_t end, float* out) {
  const int64_t n = linear.rows();
  if (linear.is_trellis()) {
    const TrellisMatrix& t = linear.trellis;
    const int64_t count = end - begin;
    thread_local AlignedFloats staging;
    staging.reserve_zeroed(x.m * count);
    float* z = staging.data();
    const int64_t words_per_tile_row = t.k / 16 * 8 * t.bits;
    trellis_cpu::matmul({x.rotated, t.packed + begin / 16 * words_per_tile_row, z, x.m, count, t.k, t.bits,
                         t.codebook, 1});
    trellis_cpu::hadamard(z, z, x.m, count, t.had_out, 1);
    for (int64_t i = 0; i < x.m; ++i) {
      for (int64_t r = 0; r < count; ++r) out[i * n + begin + r] = z[i * count + r] * half_to_float(t.sv[begin + r]);
    }
  } else {
    gemv_rows(linear.w, *x.gemv, begin, end, out);
  }
  if (linear.bias) {
    for (int64_t i = 0; i < x.m; ++i) {
      for (int64_t r = begin; r < end; ++r) out[i * n + r] += linear.bias[r];
    }
  }
}

}  // namespace

void DecoderStack::rms_norm(const float* x, const float* weight, int64_t rows, float* out) const {
  const int64_t h = shape_.hidden;
  for (int64_t b = 0; b < rows; ++b) {
    const float* xr = x + b * h;
    float sum = 0.0f;
    for (int64_t i = 0; i < h; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / float(h) + shape_.eps);
    for (int64_t i = 0; i < h; ++i) out[b * h + i] = weight[i] * (xr[i] * inv);
  }
}

// Query head `head` of sequence b: its new key/value are q_/k_/v_ (rotated in place before, and
// already written to the cache); attention over the cached positions before it (those the mask allows)
// and the new one.
void DecoderStack::attend(const DecodeStepArgs& args, int64_t layer, int64_t b, int64_t head, float* scores) {
  const int64_t hd = shape_.head_dim, group = shape_.heads / shape_.kv_heads, kv = head / group;
  const bool avx512 = vector_loops_avx512();
  const float* q = q_.data() + (b * shape_.heads + head) * hd;
  const float* k_new = k_.data() + (b * shape_.kv_heads + kv) * hd;
  const float* v_new = v_.data() + (b * shape_.kv_heads + kv) * hd;
  const CachedRows rows{args.cache.keys, args.cache.values, &args.cache, layer, b, args.batch, shape_.kv_heads, kv, hd};
  const uint8_t* mask = args.key_mask ? args.key_mask + b * args.cache.max_len : nullptr;
  const int64_t start = args.positions[b];
  float* out = attn_.data() + (b * shape_.heads + head) * hd;
#if METAL_MARLIN_X86
  if (avx512 && (hd == 64 || hd == 128)) {
    const auto run = hd == 64 ? attend_head_avx512<4> : attend_head_avx512<8>;
    return run(q, rows, mask, start, k_new, v_new, args.scaling, scores, out);
  }
#endif

  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < start; ++s) {
    if (mask && !mask[s]) continue;
    scores[s] = dot(q, rows.keys + rows.offset(s), hd, avx512) * args.scaling;
    max_score = std::max(max_score, scores[s]);
  }
  const float own = dot(q, k_new, hd, avx512) * args.scaling;
  max_score = std::max(max_score, own);
  std::fill_n(out, hd, 0.0f);
  float total = 0.0f;
  for (int64_t s = 0; s < start; ++s) {
    if (mask && !mask[s]) continue;
    const float p = std::exp(scores[s] - max_score);
    total += p;
    axpy(p, rows.values + rows.offset(s), hd, out, avx512);
  }
  const float p_own = std::exp(own - max_score);
  total += p_own;
  axpy(p_own, v_new, hd, out, avx512);
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

void DecoderStack::run_layer(const DecoderLayerWeights& L, int64_t index, const DecodeStepArgs& args) {
  const DecoderShape& S = shape_;
  const int64_t B = args.batch, hd = S.head_dim;
  float* hidden = args.hidden;
  PhaseClock clock(args.phase_seconds);

  // Attention: q/k/v rows over the threads.
  rms_norm(hidden, L.input_norm, B, normed_.data());
  const std::array<const DecoderLinear*, 3> qkv = {&L.q, &L.k, &L.v};
  const auto qkv_in = prepare_inputs<3>(qkv, normed_.data(), B, qkv_in_, qkv_rotated_);
  const std::array<float*, 3> qkv_out = {q_.data(), k_.data(), v_.data()};
  const int64_t q_tasks = row_tasks(L.q), k_tasks = row_tasks(L.k);
  const int64_t n_qkv_tasks = q_tasks + k_tasks + row_tasks(L.v);
  parallel_for(plan_threads(args.n_threads, n_qkv_tasks), n_qkv_tasks, [&](int64_t task, int) {
    const int which = task < q_tasks ? 0 : task < q_tasks + k_tasks ? 1 : 2;
    const DecoderLinear& linear = *qkv[which];
    const int64_t first = which == 0 ? 0 : which == 1 ? q_tasks : q_tasks + k_tasks;
    const int64_t begin = (task - first) * task_rows(linear);
    linear_rows(linear, qkv_in[which], begin, std::min(linear.rows(), begin + task_rows(linear)), qkv_out[which]);
  });

  clock.mark(0);

  // Norms and RoPE of the new keys (written to the cache) and queries, then attention per head.
  for (int64_t b = 0; b < B; ++b) {
    const float* cos = args.cos + b * hd;
    const float* sin = args.sin + b * hd;
    for (int64_t h = 0; h < S.heads; ++h) norm_and_rotate(q_.data() + (b * S.heads + h) * hd, hd, L.q_norm, S.eps, cos, sin);
    for (int64_t h = 0; h < S.kv_heads; ++h) {
      float* k = k_.data() + (b * S.kv_heads + h) * hd;
      norm_and_rotate(k, hd, L.k_norm, S.eps, cos, sin);
      const int64_t at = args.cache.row(index, b, B, S.kv_heads, h, args.positions[b], hd);
      std::copy_n(k, hd, args.cache.keys + at);
      std::copy_n(v_.data() + (b * S.kv_heads + h) * hd, hd, args.cache.values + at);
    }
  }
  const int64_t n_heads = B * S.heads;
  const int attn_threads = plan_threads(args.n_threads, n_heads);
  parallel_for(attn_threads, n_heads, [&](int64_t task, int thread) {
    attend(args, index, task / S.heads, task % S.heads, scores_[size_t(thread)].data());
  });

  clock.mark(1);

  // hidden += linear(input): o_proj and down_proj, rows over the threads.
  const auto add_projection = [&](const DecoderLinear& linear, const LinearInput& input) {
    const int64_t step = task_rows(linear), tasks = row_tasks(linear);
    parallel_for(plan_threads(args.n_threads, tasks), tasks, [&](int64_t task, int) {
      const int64_t begin = task * step, end = std::min(S.hidden, begin + step);
      linear_rows(linear, input, begin, end, proj_.data());
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t r = begin; r < end; ++r) hidden[b * S.hidden + r] += proj_.data()[b * S.hidden + r];
      }
    });
  };

  // o_proj + residual.
  add_projection(L.o, prepare_inputs<1>({&L.o}, attn_.data(), B, o_in_, o_rotated_)[0]);

  clock.mark(2);

  // MLP: gate and up rows together, so a task finishes act = silu(gate) * up for its rows.
  rms_norm(hidden, L.post_norm, B, normed_.data());
  const auto mlp_in = prepare_inputs<2>({&L.gate, &L.up}, normed_.data(), B, mlp_in_, mlp_rotated_);
  // Ranges that start on a block boundary of both (trellis output Hadamard blocks).
  const int64_t mlp_step = std::lcm(task_rows(L.gate), task_rows(L.up));
  const int64_t mlp_tasks = (S.intermediate + mlp_step - 1) / mlp_step;
  float* gate = gate_up_.data();
  float* up = gate_up_.data() + B * S.intermediate;
  parallel_for(plan_threads(args.n_threads, mlp_tasks), mlp_tasks, [&](int64_t task, int) {
    const int64_t begin = task * mlp_step, end = std::min(S.intermediate, begin + mlp_step);
    linear_rows(L.gate, mlp_in[0], begin, end, gate);
    linear_rows(L.up, mlp_in[1], begin, end, up);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t r = begin; r < end; ++r) {
        const float g = gate[b * S.intermediate + r];
        act_.data()[b * S.intermediate + r] = g / (1.0f + std::exp(-g)) * up[b * S.intermediate + r];
      }
    }
  });

  clock.mark(3);

  // down_proj + residual.
  add_projection(L.down, prepare_inputs<1>({&L.down}, act_.data(), B, down_in_, down_rotated_)[0]);
  clock.mark(4);
}

void DecoderStack::decode(const DecodeStepArgs& args) {
  const DecoderShape& S = shape_;
  const int64_t B = args.batch;
  normed_.reserve_zeroed(B * S.hidden);
  q_.reserve_zeroed(B * S.heads * S.head_dim);
  k_.reserve_zeroed(B * S.kv_heads * S.head_dim);
  v_.reserve_zeroed(B * S.kv_heads * S.head_dim);
  attn_.reserve_zeroed(B * S.heads * S.head_dim);
  proj_.reserve_zeroed(B * S.hidden);
  act_.reserve_zeroed(B * S.intermediate);
  gate_up_.reserve_zeroed(2 * B * S.intermediate);
  const int threads = plan_threads(args.n_threads, B * S.heads);
  if (int(scores_.size()) < threads) scores_.resize(size_t(threads));
  for (auto& s : scores_) s.reserve_zeroed(args.cache.max_len);
  for (int64_t i = 0; i < n_layers(); ++i) run_layer(layers_[size_t(i)], i, args);
}

}  // namespace metal_marlin::cpu
