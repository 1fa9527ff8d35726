// The CPU quantized-matmul kernels: out = x @ dequant(W).T + bias, fused (W is decoded a block or a
// tile at a time, never materialised), plus a full dequantize for tests and export.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtypes.h"
#include "common/quantized_matrix.h"

namespace metal_marlin::cpu {

struct MatmulArgs {
  QuantizedMatrix w;
  const void* x;      // [m, w.k] of `dtype`
  DType dtype;        // of x, out and bias
  int64_t m;
  const void* bias;   // [w.n] of `dtype`, or nullptr
  void* out;          // [m, w.n] of `dtype`; every element is written
  int n_threads;      // >= 1
};

// The kernel paths, slowest to fastest. The process starts on the best one the CPU supports;
// set_simd_level switches (tests run every path in one process, benchmarks compare them).
// kAvx512Vnni is kAvx512 plus the integer GEMV and GEMM of gemv_vnni.cpp / gemm_vnni.cpp for int4/int8;
// kAvx512Amx runs that GEMM's tiles on the AMX-INT8 unit (Sapphire Rapids and later, when the OS grants
// the tile state).
enum class SimdLevel { kScalar, kAvx2, kAvx512, kAvx512Vnni, kAvx512Amx };

SimdLevel best_simd_level();          // what this CPU (and OS) can run
SimdLevel current_simd_level();       // the path in effect
const char* simd_level_name(SimdLevel level);
const char* simd_level();             // name of the path in effect
// Sets the path by name ("auto" = best_simd_level(), "avx512_amx", "avx512_vnni", "avx512", "avx2", "scalar") and
// returns the
// previous name. Throws std::invalid_argument for an unknown name or a path this CPU cannot run.
std::string set_simd_level(const std::string& name);

// Entry points: run the path in effect.
void quant_matmul(const MatmulArgs& args);
// The same without the integer kernels of the avx512_vnni path (float32 activations throughout): for
// callers whose tests bound the error of exact float products (the MoE experts).
void quant_matmul_float_activations(const MatmulArgs& args);
void dequantize(const QuantizedMatrix& w, float* out);  // out: [n, k] float32

// Reads all `bytes` bytes at `data` once with the widest loads of the path in effect, split over
// n_threads threads, and returns a checksum (so the loads cannot be optimised away). Benchmarks
// time it to get the machine's streaming read bandwidth.
uint64_t read_bandwidth_probe(const void* data, int64_t bytes, int n_threads);

// The paths themselves (the SIMD ones exist only on x86: AVX2 needs avx2, fma and f16c, AVX-512
// also avx512f, avx512bw and avx512vl).
void quant_matmul_scalar(const MatmulArgs& args);
void dequantize_scalar(const QuantizedMatrix& w, float* out);
void quant_matmul_avx2(const MatmulArgs& args);
void dequantize_avx2(const QuantizedMatrix& w, float* out);
void quant_matmul_avx512(const MatmulArgs& args);
void dequantize_avx512(const QuantizedMatrix& w, float* out);

// Writes out[row, n0 .. n0 + count) = values + bias, converted to the output dtype.
inline void store_outputs(const MatmulArgs& args, int64_t row, int64_t n0, int64_t count, const float* values) {
  const int64_t index = row * args.w.n + n0;
  for (int64_t i = 0; i < count; ++i) {
    float v = values[i];
    if (args.bias) {
      const int64_t b = n0 + i;
      switch (args.dtype) {
        case DType::kFloat32: v += static_cast<const float*>(args.bias)[b]; break;
        case DType::kFloat16: v += half_to_float(static_cast<const uint16_t*>(args.bias)[b]); break;
        case DType::kBFloat16: v += bf16_to_float(static_cast<const uint16_t*>(args.bias)[b]); break;
      }
    }
    switch (args.dtype) {
      case DType::kFloat32: static_cast<float*>(args.out)[index + i] = v; break;
      case DType::kFloat16: static_cast<uint16_t*>(args.out)[index + i] = float_to_half(v); break;
      case DType::kBFloat16: static_cast<uint16_t*>(args.out)[index + i] = float_to_bf16(v); break;
    }
  }
}

// Row `row` of x as float32.
inline void load_activation_row(const MatmulArgs& args, int64_t row, float* dst) {
  const auto* base = static_cast<const char*>(args.x) + row * args.w.k * int64_t(dtype_size(args.dtype));
  convert_to_float(base, args.dtype, args.w.k, dst);
}

// Runs `gemv(part)` on near-equal slices of at most `max_rows` activation rows: for a few rows, some GEMV
// passes over W beat one GEMM pass (the GEMM's panel decode and transpose cost more than decoding W again).
template <class Gemv>
void gemv_in_row_chunks(const MatmulArgs& args, int64_t max_rows, Gemv&& gemv) {
  const int64_t n_chunks = (args.m + max_rows - 1) / max_rows;
  const size_t x_row_bytes = size_t(args.w.k) * dtype_size(args.dtype);
  const size_t out_row_bytes = size_t(args.w.n) * dtype_size(args.dtype);
  for (int64_t chunk = 0, m0 = 0; chunk < n_chunks; ++chunk) {
    MatmulArgs part = args;
    part.m = (args.m - m0) / (n_chunks - chunk);
    part.x = static_cast<const char*>(args.x) + size_t(m0) * x_row_bytes;
    part.out = static_cast<char*>(args.out) + size_t(m0) * out_row_bytes;
    gemv(part);
    m0 += part.m;
  }
}

// A zero-filled buffer whose data() is 64-byte aligned (for aligned vector loads and whole cache lines).
template <class T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t size) { resize(size); }
  void resize(int64_t size) { storage_.assign(size_t(size) + kAlign / sizeof(T), T(0)); }
  // Grows (zero-filling everything) only when `size` is larger than the capacity: for scratch reused
  // across calls without allocating.
  void reserve_zeroed(int64_t size) {
    if (size_t(size) + kAlign / sizeof(T) > storage_.size()) resize(size);
  }
  T* data() { return align(storage_.data()); }
  const T* data() const { return align(const_cast<T*>(storage_.data())); }

 private:
  static constexpr uintptr_t kAlign = 64;
  static T* align(T* p) {
    const auto address = reinterpret_cast<uintptr_t>(p);
    return p + ((kAlign - address % kAlign) % kAlign) / sizeof(T);
  }
  std::vector<T> storage_;
};
using AlignedFloats = AlignedBuffer<float>;

}  // namespace metal_marlin::cpu
