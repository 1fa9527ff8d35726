// gemv.h: the path choice, the scalar path, and quant_matmul's integer GEMV.
#include "cpu/gemv.h"

#include <algorithm>
#include <vector>

#include "cpu/group_gemv.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu {

bool gemv_uses_vnni(SimdLevel level, Format format) {
  return level >= SimdLevel::kAvx512Vnni && (format == Format::kInt4 || format == Format::kInt8);
}

bool gemv_prepared_for(const GemvActivations& a, const QuantizedMatrix& w) {
  return a.m > 0 && a.format == w.format && a.k == w.k && a.group_size == w.group_size &&
         a.level == current_simd_level();
}

void prepare_gemv(const QuantizedMatrix& w, const float* x, int64_t m, GemvActivations& a) {
  a.format = w.format;
  a.k = w.k;
  a.group_size = w.group_size;
  a.m = m;
  a.level = current_simd_level();
  a.vnni = gemv_uses_vnni(a.level, w.format);
  switch (a.level) {
#if METAL_MARLIN_X86
    case SimdLevel::kAvx512Amx:
    case SimdLevel::kAvx512Vnni:
      if (a.vnni) return prepare_gemv_vnni(w, x, m, a.ints);
      return prepare_gemv_avx512(w, x, m, a.floats);
    case SimdLevel::kAvx512: return prepare_gemv_avx512(w, x, m, a.floats);
    case SimdLevel::kAvx2: return prepare_gemv_avx2(w, x, m, a.floats);
#endif
    default:
      a.plain.reserve_zeroed(m * w.k);
      std::copy_n(x, m * w.k, a.plain.data());
  }
}

void gemv_rows(const QuantizedMatrix& w, const GemvActivations& a, int64_t row_begin, int64_t row_end, float* out) {
  switch (a.level) {
#if METAL_MARLIN_X86
    case SimdLevel::kAvx512Amx:
    case SimdLevel::kAvx512Vnni:
      if (a.vnni) return gemv_rows_vnni(w, a.ints, a.m, row_begin, row_end, out);
      return gemv_rows_avx512(w, a.floats, a.m, row_begin, row_end, out);
    case SimdLevel::kAvx512: return gemv_rows_avx512(w, a.floats, a.m, row_begin, row_end, out);
    case SimdLevel::kAvx2: return gemv_rows_avx2(w, a.floats, a.m, row_begin, row_end, out);
#endif
    default: break;
  }
  thread_local std::vector<float> row;
  row.resize(size_t(w.k));
  visit_format(w.format, [&](auto f) {
    for (int64_t n = row_begin; n < row_end; ++n) {
      dequantize_row_scalar<decltype(f)::value>(w, n, row.data());
      for (int64_t i = 0; i < a.m; ++i) {
        const float* x = a.plain.data() + i * w.k;
        float sum = 0.0f;
        for (int64_t j = 0; j < w.k; ++j) sum += x[j] * row[size_t(j)];
        out[i * w.n + n] = sum;
      }
    }
  });
}

// quant_matmul for at most kGemvChunkedMaxRows rows on the integer path.
void quant_matmul_vnni_gemv(const MatmulArgs& args) {
  gemv_in_row_chunks(args, group_kernels::kGemvMaxRows, [](const MatmulArgs& part) {
    std::vector<float> x(size_t(part.m * part.w.k));
    for (int64_t i = 0; i < part.m; ++i) load_activation_row(part, i, x.data() + i * part.w.k);
    GemvActivations a;
    prepare_gemv(part.w, x.data(), part.m, a);
    // float32 without bias: straight into out (a large output, e.g. an LM head's logits, is not copied).
    const bool direct = part.dtype == DType::kFloat32 && !part.bias;
    std::vector<float> staging(direct ? 0 : size_t(part.m * part.w.n));
    float* out = direct ? static_cast<float*>(part.out) : staging.data();
    const int64_t rows_per_task = group_kernels::kGemvRowsPerTask;
    const int64_t n_tasks = (part.w.n + rows_per_task - 1) / rows_per_task;
    parallel_for(plan_threads(part.n_threads, n_tasks), n_tasks, [&](int64_t task, int) {
      gemv_rows(part.w, a, task * rows_per_task, std::min(part.w.n, (task + 1) * rows_per_task), out);
    });
    if (!direct) {
      for (int64_t i = 0; i < part.m; ++i) store_outputs(part, i, 0, part.w.n, out + i * part.w.n);
    }
  });
}

}  // namespace metal_marlin::cpu
