// Portable kernels: any CPU, any compiler. Each task dequantizes a few rows of W to float32 and
// dots them with every row of x, so W is still decoded once per call and never materialised.
#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu {
namespace {

constexpr int64_t kRowsPerTask = 8;

// n is a multiple of 32 (K always is); eight partial sums let the compiler vectorise.
float dot(const float* a, const float* b, int64_t n) {
  float partial[8] = {};
  for (int64_t i = 0; i < n; i += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  }
  const float low = (partial[0] + partial[4]) + (partial[1] + partial[5]);
  const float high = (partial[2] + partial[6]) + (partial[3] + partial[7]);
  return low + high;
}

template <Format F>
void matmul_scalar(const MatmulArgs& args) {
  const QuantizedMatrix& w = args.w;
  const int64_t k = w.k;

  std::vector<float> converted;
  const float* x = static_cast<const float*>(args.x);
  if (args.dtype != DType::kFloat32) {
    converted.resize(size_t(args.m * k));
    for (int64_t row = 0; row < args.m; ++row) load_activation_row(args, row, converted.data() + row * k);
    x = converted.data();
  }

  const int64_t n_tasks = (w.n + kRowsPerTask - 1) / kRowsPerTask;
  const int n_threads = plan_threads(args.n_threads, n_tasks);
  std::vector<std::vector<float>> scratch(size_t(n_threads), std::vector<float>(size_t(kRowsPerTask * (k + 1))));
  parallel_for(n_threads, n_tasks, [&](int64_t task, int thread) {
    float* rows = scratch[size_t(thread)].data();
    float* results = rows + kRowsPerTask * k;
    const int64_t n0 = task * kRowsPerTask;
    const int64_t count = std::min(kRowsPerTask, w.n - n0);
    for (int64_t r = 0; r < count; ++r) dequantize_row_scalar<F>(w, n0 + r, rows + r * k);
    for (int64_t m = 0; m < args.m; ++m) {
      for (int64_t r = 0; r < count; ++r) results[r] = dot(x + m * k, rows + r * k, k);
      store_outputs(args, m, n0, count, results);
    }
  });
}

}  // namespace

void quant_matmul_scalar(const MatmulArgs& args) {
  visit_format(args.w.format, [&](auto f) { matmul_scalar<decltype(f)::value>(args); });
}

void dequantize_scalar(const QuantizedMatrix& w, float* out) {
  visit_format(w.format, [&](auto f) {
    for (int64_t n = 0; n < w.n; ++n) dequantize_row_scalar<decltype(f)::value>(w, n, out + n * w.k);
  });
}

}  // namespace metal_marlin::cpu
