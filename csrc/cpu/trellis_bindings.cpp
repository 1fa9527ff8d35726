// Python bindings of the trellis kernels (registered into metal_marlin._core by bindings.cpp).
// Every argument is checked (dtype, shape, device, contiguity) with an error naming it; the kernels
// run with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>
#include <vector>

#include "binding_checks.h"
#include "common/trellis.h"
#include "cpu/trellis_kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace tc = metal_marlin::cpu::trellis_cpu;
namespace tr = metal_marlin::trellis;
using namespace metal_marlin::bindings;

void check_float32(const char* fn, const char* name, const Tensor& t) {
  check_dtype(fn, name, t, nb::dlpack::dtype_code::Float, 32, "float32");
}

void check_int32(const char* fn, const char* name, const Tensor& t) {
  check_dtype(fn, name, t, nb::dlpack::dtype_code::Int, 32, "int32");
}

tr::Codebook parse_codebook(const char* fn, const std::string& name) {
  if (auto cb = tr::parse_codebook(name)) return *cb;
  value_error(fn, "unknown codebook '" + name + "'; expected one of 3inst, mcg, 1mad, mul1");
}

void check_bits(const char* fn, int bits) {
  if (bits < tr::kMinBits || bits > tr::kMaxBits) {
    value_error(fn, "bits must be in 1..8, got " + std::to_string(bits));
  }
}

// Shape of `t` with its last dimension replaced by `last`; `t` must have at least one dimension.
std::vector<int64_t> with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.ndim());
  for (size_t i = 0; i < t.ndim(); ++i) shape[i] = int64_t(t.shape(i));
  shape.back() = last;
  return shape;
}

// Number of tiles of a [..., last] tensor (the product of the leading dimensions).
int64_t leading_count(const Tensor& t) {
  int64_t count = 1;
  for (size_t i = 0; i + 1 < t.ndim(); ++i) count *= int64_t(t.shape(i));
  return count;
}

void trellis_codebook(const std::string& codebook, const Tensor& out) {
  constexpr const char* fn = "trellis_codebook";
  const tr::Codebook cb = parse_codebook(fn, codebook);
  check_float32(fn, "out", out);
  check_shape(fn, "out", out, {int64_t(tr::kNumStates)});
  float* dst = static_cast<float*>(out.data());
  nb::gil_scoped_release release;
  const float* table = tc::codebook_table(cb);
  std::copy(table, table + tr::kNumStates, dst);
}

void trellis_quantize(const Tensor& targets, int bits, const std::string& codebook, const Tensor& packed_out,
                      const Tensor& values_out, int n_threads) {
  constexpr const char* fn = "trellis_quantize";
  check_bits(fn, bits);
  const tr::Codebook cb = parse_codebook(fn, codebook);
  check_threads(fn, n_threads);
  check_float32(fn, "targets", targets);
  if (targets.ndim() < 1 || targets.shape(targets.ndim() - 1) != size_t(tr::kTileSteps)) {
    value_error(fn, "targets must have shape [T, 256] (or [..., 256]), got " + shape_string(targets));
  }
  check_int32(fn, "packed_out", packed_out);
  check_shape(fn, "packed_out", packed_out, with_last(targets, tr::words_per_tile(bits)));
  check_float32(fn, "values_out", values_out);
  check_shape(fn, "values_out", values_out, with_last(targets, tr::kTileSteps));
  const int64_t n_tiles = leading_count(targets);
  const auto* src = static_cast<const float*>(targets.data());
  auto* packed = static_cast<uint32_t*>(packed_out.data());
  auto* values = static_cast<float*>(values_out.data());
  nb::gil_scoped_release release;
  tc::quantize(src, n_tiles, bits, cb, packed, values, n_threads);
}

void trellis_decode(const Tensor& packed, int bits, const std::string& codebook, const Tensor& out) {
  constexpr const char* fn = "trellis_decode";
  check_bits(fn, bits);
  const tr::Codebook cb = parse_codebook(fn, codebook);
  check_int32(fn, "packed", packed);
  if (packed.ndim() < 1 || packed.shape(packed.ndim() - 1) != size_t(tr::words_per_tile(bits))) {
    value_error(fn, "packed must have shape [T, 8*bits] = [T, " + std::to_string(tr::words_per_tile(bits)) +
                        "] (or [..., 8*bits]), got " + shape_string(packed));
  }
  check_float32(fn, "out", out);
  check_shape(fn, "out", out, with_last(packed, tr::kTileSteps));
  const int64_t n_tiles = leading_count(packed);
  const auto* src = static_cast<const uint32_t*>(packed.data());
  auto* dst = static_cast<float*>(out.data());
  nb::gil_scoped_release release;
  tc::decode(src, n_tiles, bits, cb, dst);
}

void trellis_matmul(const Tensor& x, const Tensor& packed, const Tensor& out, int bits, const std::string& codebook,
                    int n_threads) {
  constexpr const char* fn = "trellis_matmul";
  check_bits(fn, bits);
  const tr::Codebook cb = parse_codebook(fn, codebook);
  check_threads(fn, n_threads);
  check_float32(fn, "x", x);
  if (x.ndim() != 2) value_error(fn, "x must be 2-D [M, K], got shape " + shape_string(x));
  const int64_t m = int64_t(x.shape(0)), k = int64_t(x.shape(1));
  if (k % 16 != 0) value_error(fn, "K=" + std::to_string(k) + " (x.shape[1]) must be a multiple of 16");
  check_int32(fn, "packed", packed);
  if (packed.ndim() != 3 || int64_t(packed.shape(1)) * 16 != k ||
      packed.shape(2) != size_t(tr::words_per_tile(bits))) {
    value_error(fn, "packed must have shape [N/16, K/16, 8*bits] = [N/16, " + std::to_string(k / 16) + ", " +
                        std::to_string(tr::words_per_tile(bits)) + "], got " + shape_string(packed));
  }
  const int64_t n = int64_t(packed.shape(0)) * 16;
  check_float32(fn, "out", out);
  check_shape(fn, "out", out, {m, n});
  const tc::MatmulArgs args{static_cast<const float*>(x.data()),
                            static_cast<const uint32_t*>(packed.data()),
                            static_cast<float*>(out.data()),
                            m,
                            n,
                            k,
                            bits,
                            cb,
                            n_threads};
  nb::gil_scoped_release release;
  tc::matmul(args);
}

void hadamard(const Tensor& x, int64_t block, const Tensor& out, int n_threads) {
  constexpr const char* fn = "hadamard";
  check_float32(fn, "x", x);
  if (x.ndim() < 1) value_error(fn, "x must have at least one dimension");
  const int64_t n = int64_t(x.shape(x.ndim() - 1));
  if (block < 1 || (block & (block - 1)) != 0 || n % block != 0) {
    value_error(fn, "block=" + std::to_string(block) + " must be a power of two dividing the last dimension " +
                        std::to_string(n));
  }
  check_float32(fn, "out", out);
  check_shape(fn, "out", out, with_last(x, n));
  check_threads(fn, n_threads);
  const int64_t m = leading_count(x);
  const auto* src = static_cast<const float*>(x.data());
  auto* dst = static_cast<float*>(out.data());
  const size_t bytes = size_t(m * n) * sizeof(float);
  const auto* s0 = reinterpret_cast<const char*>(src);
  const auto* d0 = reinterpret_cast<const char*>(dst);
  if (src != dst && s0 < d0 + bytes && d0 < s0 + bytes) {
    value_error(fn, "out must be x itself or not overlap it");
  }
  nb::gil_scoped_release release;
  tc::hadamard(src, dst, m, n, block, n_threads);
}

}  // namespace

void register_trellis_bindings(nb::module_& m) {
  m.def("trellis_simd_level", &tc::simd_name,
        "The trellis kernels' path on this machine: 'avx512' (AVX-512 BW with FP16, VBMI, VBMI2), 'avx2' "
        "(AVX2, FMA, F16C) or 'scalar'. set_simd_level('scalar') or ('avx2') caps it. Every path returns "
        "the same Viterbi bit streams; the matmul paths decode the same weights and differ only in the "
        "float32 summation order.");

  m.def("trellis_codebook", &trellis_codebook, "codebook"_a, "out"_a.noconvert(),
        "Writes the value of every 16-bit state (float32 [65536]) of codebook '3inst', 'mcg', '1mad' or "
        "'mul1' into out, bit-exactly as docs/formats.md specifies.");

  m.def("trellis_quantize", &trellis_quantize, "targets"_a.noconvert(), "bits"_a, "codebook"_a,
        "packed_out"_a.noconvert(), "values_out"_a.noconvert(), "n_threads"_a,
        "Tail-biting Viterbi: for every tile of targets (float32 [T, 256], steps in order) finds the "
        "circular bit stream of 256*bits bits minimising sum_t (value(s_t) - target_t)^2 (two-pass "
        "tail-biting). Writes the streams to packed_out (int32 [T, 8*bits]) and their decoded values to "
        "values_out (float32 [T, 256]). Leading dimensions [..., 256] are flattened. Runs on n_threads "
        "threads (tiles in parallel).");

  m.def("trellis_decode", &trellis_decode, "packed"_a.noconvert(), "bits"_a, "codebook"_a, "out"_a.noconvert(),
        "Decodes tile streams: packed int32 [..., 8*bits] -> out float32 [..., 256] (step order).");

  m.def("trellis_matmul", &trellis_matmul, "x"_a.noconvert(), "packed"_a.noconvert(), "out"_a.noconvert(), "bits"_a,
        "codebook"_a, "n_threads"_a,
        "out[M, N] = x[M, K] @ Q^T, with Q [N, K] decoded on the fly from packed int32 [N/16, K/16, "
        "8*bits] (tile (i, j) = Q[16i:16i+16, 16j:16j+16], row-major steps). x and out float32. Every "
        "element of out is written.");

  m.def("hadamard", &hadamard, "x"_a.noconvert(), "block"_a, "out"_a.noconvert(), "n_threads"_a = 1,
        "out = x with every consecutive block of `block` elements of the last dimension multiplied by "
        "H_block / sqrt(block) (Sylvester). x, out float32 of the same shape; out may be x (in place). "
        "block: a power of two dividing the last dimension. Rows are split over n_threads threads.");
}
