// metal_marlin._core: the C++ kernels as a nanobind module. Tensors arrive through DLPack; this
// file checks every argument (dtype, shape, format) with an error that names it, then runs the
// kernel with the GIL released.
#include "binding_checks.h"
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "common/formats.h"
#include "common/trellis.h"
#include "cpu/decoder_step.h"
#include "cpu/kernels.h"
#include "cpu/moe_experts.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mm = metal_marlin;

void register_trellis_bindings(nb::module_& m);  // csrc/cpu/trellis_bindings.cpp

// ---- Metal (macOS builds: CMake defines METAL_MARLIN_METAL and compiles csrc/metal/) ----
#ifdef METAL_MARLIN_METAL
void register_metal_bindings(nb::module_& m);  // csrc/metal/metal_bindings.cpp: the _core.metal submodule
constexpr bool kHasMetal = true;
#else
constexpr bool kHasMetal = false;
#endif
// ---- end Metal ----

namespace {

using namespace metal_marlin::bindings;

std::optional<mm::DType> float_dtype(const Tensor& t) {
  using Code = nb::dlpack::dtype_code;
  if (has_dtype(t, Code::Float, 32)) return mm::DType::kFloat32;
  if (has_dtype(t, Code::Float, 16)) return mm::DType::kFloat16;
  if (has_dtype(t, Code::Bfloat, 16)) return mm::DType::kBFloat16;
  return std::nullopt;
}

const char* float_dtype_name(mm::DType dtype) {
  switch (dtype) {
    case mm::DType::kFloat32: return "float32";
    case mm::DType::kFloat16: return "float16";
    case mm::DType::kBFloat16: break;
  }
  return "bfloat16";
}

// bias and out must have the activations' dtype.
void check_same_dtype(const char* fn, const char* name, const Tensor& t, mm::DType dtype) {
  if (float_dtype(t) != dtype) {
    type_error(fn, std::string(name) + " must have x's dtype " + float_dtype_name(dtype) + ", got " +
                       dtype_name(t.dtype()));
  }
}

mm::Format parse_format(const char* fn, const std::string& name) {
  if (auto format = mm::parse_format(name)) return *format;
  value_error(fn, "unknown format '" + name + "'; expected one of int2, int3, int4, int8, fp4, fp8");
}

// Checks and wraps (packed, scales, offsets) for a weight of `k` in-features. With n_experts >= 0 the
// tensors are stacked [n_experts, ...] and the result is expert 0's matrix; `prefix` starts each
// argument's name ("gate_up_" for gate_up_packed, ...).
mm::QuantizedMatrix quantized_matrix(const char* fn, mm::Format format, int64_t k, int64_t group_size,
                                     const Tensor& packed, const Tensor& scales, const Tensor& offsets,
                                     const std::string& prefix = "", int64_t n_experts = -1) {
  using Code = nb::dlpack::dtype_code;
  const int bits = mm::format_bits(format);
  const std::string packed_name = prefix + "packed", scales_name = prefix + "scales";
  const std::string offsets_name = prefix + "offsets";
  std::vector<int64_t> lead;
  if (n_experts >= 0) lead.push_back(n_experts);
  const size_t dim = lead.size();
  check_dtype(fn, packed_name.c_str(), packed, Code::Int, 32, "int32");
  if (packed.ndim() != dim + 2 || (dim && int64_t(packed.shape(0)) != n_experts)) {
    value_error(fn, packed_name + " must be " + (dim ? "3-D [E=" + std::to_string(n_experts) + ", " : "2-D [") +
                        "N, K*bits/32], got shape " + shape_string(packed));
  }
  const int64_t n = int64_t(packed.shape(dim));
  if (k % mm::kBlockCodes != 0) value_error(fn, "K=" + std::to_string(k) + " must be a multiple of 32");
  if (int64_t(packed.shape(dim + 1)) * 32 != k * bits) {
    value_error(fn, packed_name + " has " + std::to_string(packed.shape(dim + 1)) + " words per row but K=" +
                        std::to_string(k) + " " + mm::format_name(format) + " codes take " +
                        std::to_string(k * bits / 32));
  }
  if (group_size <= 0 || group_size % mm::kBlockCodes != 0) {
    value_error(fn, "group_size=" + std::to_string(group_size) + " must be a positive multiple of 32");
  }
  const int64_t n_groups = (k + group_size - 1) / group_size;  // the last group is shorter if G does not divide K
  std::vector<int64_t> scale_shape = lead;
  scale_shape.insert(scale_shape.end(), {n, n_groups});
  check_dtype(fn, scales_name.c_str(), scales, Code::Float, 16, "float16");
  check_shape(fn, scales_name.c_str(), scales, scale_shape);
  if (offsets.is_valid()) {
    if (!mm::format_is_integer(format)) {
      value_error(fn, std::string("format ") + mm::format_name(format) + " takes no offsets (pass None as " +
                          offsets_name + ")");
    }
    check_dtype(fn, offsets_name.c_str(), offsets, Code::Float, 16, "float16");
    check_shape(fn, offsets_name.c_str(), offsets, scale_shape);
  }
  return mm::QuantizedMatrix{format,
                             n,
                             k,
                             group_size,
                             static_cast<const uint32_t*>(packed.data()),
                             static_cast<const uint16_t*>(scales.data()),
                             offsets.is_valid() ? static_cast<const uint16_t*>(offsets.data()) : nullptr};
}

void quant_matmul(const Tensor& x, const Tensor& packed, const Tensor& scales, const Tensor& offsets,
                  const Tensor& bias, const Tensor& out, const std::string& format_name, int64_t group_size,
                  int n_threads) {
  constexpr const char* fn = "quant_matmul";
  const mm::Format format = parse_format(fn, format_name);
  const std::optional<mm::DType> dtype = float_dtype(x);
  if (!dtype) type_error(fn, "x must be float32, float16 or bfloat16, got " + dtype_name(x.dtype()));
  if (x.ndim() != 2) value_error(fn, "x must be 2-D [M, K], got shape " + shape_string(x));
  const int64_t m = int64_t(x.shape(0));
  const int64_t k = int64_t(x.shape(1));
  const mm::QuantizedMatrix w = quantized_matrix(fn, format, k, group_size, packed, scales, offsets);
  if (bias.is_valid()) {
    check_same_dtype(fn, "bias", bias, *dtype);
    check_shape(fn, "bias", bias, {w.n});
  }
  check_same_dtype(fn, "out", out, *dtype);
  check_shape(fn, "out", out, {m, w.n});
  if (n_threads < 1) value_error(fn, "n_threads must be >= 1, got " + std::to_string(n_threads));

  const void* bias_data = bias.is_valid() ? bias.data() : nullptr;
  const mm::cpu::MatmulArgs args{w, x.data(), *dtype, m, bias_data, out.data(), n_threads};
  nb::gil_scoped_release release;
  mm::cpu::quant_matmul(args);
}

void moe_experts(const Tensor& hidden, const Tensor& top_k_index, const Tensor& top_k_weights,
                 const Tensor& gate_up_packed, const Tensor& gate_up_scales, const Tensor& gate_up_offsets,
                 const Tensor& down_packed, const Tensor& down_scales, const Tensor& down_offsets, const Tensor& out,
                 const std::string& format_name, int64_t group_size, int n_threads) {
  constexpr const char* fn = "moe_experts";
  using Code = nb::dlpack::dtype_code;
  const mm::Format format = parse_format(fn, format_name);
  const std::optional<mm::DType> dtype = float_dtype(hidden);
  if (!dtype) type_error(fn, "hidden must be float32, float16 or bfloat16, got " + dtype_name(hidden.dtype()));
  if (hidden.ndim() != 2) value_error(fn, "hidden must be 2-D [T, H], got shape " + shape_string(hidden));
  const int64_t tokens = int64_t(hidden.shape(0));
  const int64_t h = int64_t(hidden.shape(1));
  check_dtype(fn, "top_k_index", top_k_index, Code::Int, 64, "int64");
  if (top_k_index.ndim() != 2 || int64_t(top_k_index.shape(0)) != tokens) {
    value_error(fn, "top_k_index must be 2-D [T=" + std::to_string(tokens) + ", k], got shape " +
                        shape_string(top_k_index));
  }
  const int64_t top_k = int64_t(top_k_index.shape(1));
  check_dtype(fn, "top_k_weights", top_k_weights, Code::Float, 32, "float32");
  check_shape(fn, "top_k_weights", top_k_weights, {tokens, top_k});
  if (gate_up_packed.ndim() != 3) {
    value_error(fn, "gate_up_packed must be 3-D [E, 2I, H*bits/32], got shape " + shape_string(gate_up_packed));
  }
  const int64_t n_experts = int64_t(gate_up_packed.shape(0));
  const mm::QuantizedMatrix gate_up =
      quantized_matrix(fn, format, h, group_size, gate_up_packed, gate_up_scales, gate_up_offsets, "gate_up_",
                       n_experts);
  if (gate_up.n % 2 != 0) {
    value_error(fn, "gate_up_packed must have an even number of rows 2I (gate, then up), got " +
                        std::to_string(gate_up.n));
  }
  const mm::QuantizedMatrix down = quantized_matrix(fn, format, gate_up.n / 2, group_size, down_packed, down_scales,
                                                    down_offsets, "down_", n_experts);
  if (down.n != h) {
    value_error(fn, "down_packed must have H=" + std::to_string(h) + " rows per expert, got " +
                        std::to_string(down.n));
  }
  check_same_dtype(fn, "out", out, *dtype);
  check_shape(fn, "out", out, {tokens, h});
  check_threads(fn, n_threads);

  const mm::cpu::MoeExpertsArgs args{gate_up,
                                     down,
                                     n_experts,
                                     hidden.data(),
                                     *dtype,
                                     tokens,
                                     top_k,
                                     static_cast<const int64_t*>(top_k_index.data()),
                                     static_cast<const float*>(top_k_weights.data()),
                                     out.data(),
                                     n_threads};
  nb::gil_scoped_release release;
  mm::cpu::moe_experts(args);
}

void dequantize(const Tensor& packed, const Tensor& scales, const Tensor& offsets, const Tensor& out,
                const std::string& format_name, int64_t group_size) {
  constexpr const char* fn = "dequantize";
  const mm::Format format = parse_format(fn, format_name);
  check_dtype(fn, "out", out, nb::dlpack::dtype_code::Float, 32, "float32");
  if (out.ndim() != 2) value_error(fn, "out must be 2-D [N, K], got shape " + shape_string(out));
  const int64_t k = int64_t(out.shape(1));
  const mm::QuantizedMatrix w = quantized_matrix(fn, format, k, group_size, packed, scales, offsets);
  check_shape(fn, "out", out, {w.n, w.k});
  float* dst = static_cast<float*>(out.data());
  nb::gil_scoped_release release;
  mm::cpu::dequantize(w, dst);
}

uint64_t read_bandwidth_probe(const Tensor& buffer, int n_threads) {
  constexpr const char* fn = "read_bandwidth_probe";
  using Code = nb::dlpack::dtype_code;
  if (!has_dtype(buffer, Code::UInt, 8) && !has_dtype(buffer, Code::Int, 32)) {
    type_error(fn, "buffer must be uint8 or int32, got " + dtype_name(buffer.dtype()));
  }
  if (n_threads < 1) value_error(fn, "n_threads must be >= 1, got " + std::to_string(n_threads));
  const int64_t bytes = int64_t(buffer.nbytes());
  const void* data = buffer.data();
  nb::gil_scoped_release release;
  return mm::cpu::read_bandwidth_probe(data, bytes, n_threads);
}

}  // namespace

// The fused decode step (csrc/cpu/decoder_step.h). The Python object keeps every weight tensor it
// was given alive; the model's modules must not be replaced while it is in use (the runtime builds
// a new one when they are).
class DecoderStackBinding {
 public:
  DecoderStackBinding(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                      float eps)
      : stack_({hidden, heads, kv_heads, head_dim, intermediate, eps}) {
    constexpr const char* fn = "DecoderStack";
    if (hidden <= 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || intermediate <= 0) {
      value_error(fn, "hidden, heads, kv_heads, head_dim and intermediate must be positive");
    }
    if (heads % kv_heads) value_error(fn, "heads=" + std::to_string(heads) + " is not a multiple of kv_heads=" +
                                              std::to_string(kv_heads));
    if (head_dim % 2) value_error(fn, "head_dim=" + std::to_string(head_dim) + " must be even (RoPE pairs)");
  }

  // linears: 7 tuples (name, packed, scales, offsets or None, bias or None, format, group_size) for
  // q, k, v, o, gate, up, down.
  void add_layer(const Tensor& input_norm, const Tensor& post_norm, const Tensor& q_norm, const Tensor& k_norm,
                 const nb::list& linears) {
    const std::string layer = "DecoderStack.add_layer (layer " + std::to_string(stack_.n_layers()) + ")";
    const char* fn = layer.c_str();
    const mm::cpu::DecoderShape& S = stack_.shape();
    mm::cpu::DecoderLayerWeights w{};
    w.input_norm = vector_of(fn, "input_norm", input_norm, S.hidden);
    w.post_norm = vector_of(fn, "post_norm", post_norm, S.hidden);
    w.q_norm = q_norm.is_valid() ? vector_of(fn, "q_norm", q_norm, S.head_dim) : nullptr;
    w.k_norm = k_norm.is_valid() ? vector_of(fn, "k_norm", k_norm, S.head_dim) : nullptr;
    if (nb::len(linears) != 7) value_error(fn, "linears must hold 7 entries (q, k, v, o, gate, up, down)");
    const int64_t q_rows = S.heads * S.head_dim, kv_rows = S.kv_heads * S.head_dim;
    const std::array<std::pair<int64_t, int64_t>, 7> shapes = {{{q_rows, S.hidden}, {kv_rows, S.hidden},
                                                                {kv_rows, S.hidden}, {S.hidden, q_rows},
                                                                {S.intermediate, S.hidden}, {S.intermediate, S.hidden},
                                                                {S.hidden, S.intermediate}}};
    mm::cpu::DecoderLinear* slots[7] = {&w.q, &w.k, &w.v, &w.o, &w.gate, &w.up, &w.down};
    for (size_t i = 0; i < 7; ++i) *slots[i] = linear(fn, nb::cast<nb::tuple>(linears[i]), shapes[i]);
    stack_.add_layer(w);
  }

  // A contiguous cache: keys/values [layers, batch, kv_heads, max_len, head_dim], key_mask [batch, max_len]
  // (bool) or None. A paged cache: keys/values [layers, num_blocks, block_size, kv_heads, head_dim] and
  // block_table [batch, width] (int32); every position before a sequence's new one is real.
  void decode(const Tensor& hidden, const Tensor& cos, const Tensor& sin, const Tensor& keys, const Tensor& values,
              const Tensor& positions, const Tensor& key_mask, const Tensor& block_table, float scaling, int n_threads,
              const Tensor& phase_seconds) {
    constexpr const char* fn = "DecoderStack.decode";
    using Code = nb::dlpack::dtype_code;
    const mm::cpu::DecoderShape& S = stack_.shape();
    check_dtype(fn, "hidden", hidden, Code::Float, 32, "float32");
    if (hidden.ndim() != 2 || int64_t(hidden.shape(1)) != S.hidden) {
      value_error(fn, "hidden must be [batch, " + std::to_string(S.hidden) + "], got " + shape_string(hidden));
    }
    const int64_t batch = int64_t(hidden.shape(0));
    if (batch < 1 || batch > mm::cpu::DecoderStack::kMaxBatch) {
      value_error(fn, "batch must be 1.." + std::to_string(mm::cpu::DecoderStack::kMaxBatch) + ", got " +
                          std::to_string(batch));
    }
    for (auto [name, t] : {std::pair{"cos", &cos}, std::pair{"sin", &sin}}) {
      check_dtype(fn, name, *t, Code::Float, 32, "float32");
      check_shape(fn, name, *t, {batch, S.head_dim});
    }
    for (auto [name, t] : {std::pair{"keys", &keys}, std::pair{"values", &values}}) {
      check_dtype(fn, name, *t, Code::Float, 32, "float32");
      if (t->ndim() != 5) value_error(fn, std::string(name) + " must be 5-D, got " + shape_string(*t));
    }
    if (shape_of(keys) != shape_of(values)) {
      value_error(fn, "keys " + shape_string(keys) + " and values " + shape_string(values) + " differ");
    }
    mm::cpu::KVLayout cache{static_cast<float*>(keys.data()), static_cast<float*>(values.data()), 0, nullptr};
    if (block_table.is_valid()) {
      check_dtype(fn, "block_table", block_table, Code::Int, 32, "int32");
      if (block_table.ndim() != 2 || int64_t(block_table.shape(0)) != batch) {
        value_error(fn, "block_table must be [batch, width], got " + shape_string(block_table));
      }
      cache.num_blocks = int64_t(keys.shape(1));
      cache.block_size = int64_t(keys.shape(2));
      check_shape(fn, "keys", keys, {stack_.n_layers(), cache.num_blocks, cache.block_size, S.kv_heads, S.head_dim});
      cache.table_width = int64_t(block_table.shape(1));
      cache.max_len = cache.table_width * cache.block_size;
      cache.block_table = static_cast<const int32_t*>(block_table.data());
      for (int64_t i = 0; i < batch * cache.table_width; ++i) {
        if (cache.block_table[i] < 0 || cache.block_table[i] >= cache.num_blocks) {
          value_error(fn, "block_table holds block " + std::to_string(cache.block_table[i]) + "; the pool has " +
                              std::to_string(cache.num_blocks));
        }
      }
      if (key_mask.is_valid()) value_error(fn, "a paged cache takes no key_mask");
    } else {
      cache.max_len = int64_t(keys.shape(3));
      check_shape(fn, "keys", keys, {stack_.n_layers(), batch, S.kv_heads, cache.max_len, S.head_dim});
      if (key_mask.is_valid()) {
        check_dtype(fn, "key_mask", key_mask, Code::Bool, 8, "bool");
        check_shape(fn, "key_mask", key_mask, {batch, cache.max_len});
      }
    }
    check_dtype(fn, "positions", positions, Code::Int, 32, "int32");
    check_shape(fn, "positions", positions, {batch});
    const auto* pos = static_cast<const int32_t*>(positions.data());
    for (int64_t b = 0; b < batch; ++b) {
      if (pos[b] < 0 || pos[b] >= cache.max_len) {
        value_error(fn, "positions[" + std::to_string(b) + "]=" + std::to_string(pos[b]) + " must be in [0, " +
                            std::to_string(cache.max_len) + ")");
      }
    }
    check_threads(fn, n_threads);
    if (phase_seconds.is_valid()) {
      check_dtype(fn, "phase_seconds", phase_seconds, Code::Float, 64, "float64");
      check_shape(fn, "phase_seconds", phase_seconds, {mm::cpu::kDecodePhases});
    }
    mm::cpu::DecodeStepArgs args{static_cast<float*>(hidden.data()),
                                 static_cast<const float*>(cos.data()),
                                 static_cast<const float*>(sin.data()),
                                 cache,
                                 pos,
                                 key_mask.is_valid() ? static_cast<const uint8_t*>(key_mask.data()) : nullptr,
                                 batch,
                                 scaling,
                                 n_threads,
                                 phase_seconds.is_valid() ? static_cast<double*>(phase_seconds.data()) : nullptr};
    nb::gil_scoped_release release;
    stack_.decode(args);
  }

  int64_t n_layers() const { return stack_.n_layers(); }

 private:
  const float* vector_of(const char* fn, const char* name, const Tensor& t, int64_t size) {
    check_dtype(fn, name, t, nb::dlpack::dtype_code::Float, 32, "float32");
    check_shape(fn, name, t, {size});
    kept_.push_back(t);
    return static_cast<const float*>(t.data());
  }

  // (name, packed, scales, offsets, bias, format, group_size) for a group-quantized linear, or
  // (name, trellis, su, sv, bias, "trellis", bits, codebook, had_in, had_out) for a trellis one.
  mm::cpu::DecoderLinear linear(const char* fn, const nb::tuple& entry, std::pair<int64_t, int64_t> shape) {
    const size_t size = nb::len(entry);
    if (size < 6 || (size != 7 && size != 10)) {
      value_error(fn, "each linear is (name, packed, scales, offsets, bias, format, group_size) or (name, trellis, "
                      "su, sv, bias, 'trellis', bits, codebook, had_in, had_out)");
    }
    const std::string name = nb::cast<std::string>(entry[0]);
    const std::string where = std::string(fn) + " " + name;
    const auto optional = [](nb::handle h) { return h.is_none() ? Tensor() : nb::cast<Tensor>(h); };
    if (nb::cast<std::string>(entry[5]) == "trellis") return trellis_linear(where, entry, shape);
    if (size != 7) value_error(where.c_str(), "a group-quantized linear is (name, packed, scales, offsets, bias, "
                                              "format, group_size)");
    const Tensor packed = nb::cast<Tensor>(entry[1]), scales = nb::cast<Tensor>(entry[2]);
    const Tensor offsets = optional(entry[3]), bias = optional(entry[4]);
    const mm::Format format = parse_format(where.c_str(), nb::cast<std::string>(entry[5]));
    const mm::QuantizedMatrix w =
        quantized_matrix(where.c_str(), format, shape.second, nb::cast<int64_t>(entry[6]), packed, scales, offsets);
    if (w.n != shape.first) {
      value_error(where.c_str(), "has " + std::to_string(w.n) + " output rows, expected " + std::to_string(shape.first));
    }
    for (const Tensor& t : {packed, scales, offsets}) {
      if (t.is_valid()) kept_.push_back(t);
    }
    mm::cpu::DecoderLinear result;
    result.w = w;
    result.bias = bias.is_valid() ? vector_of(where.c_str(), "bias", bias, w.n) : nullptr;
    return result;
  }

  mm::cpu::DecoderLinear trellis_linear(const std::string& where, const nb::tuple& entry,
                                        std::pair<int64_t, int64_t> shape) {
    using Code = nb::dlpack::dtype_code;
    const char* fn = where.c_str();
    if (nb::len(entry) != 10) {
      value_error(fn, "a trellis linear is (name, trellis, su, sv, bias, 'trellis', bits, codebook, had_in, had_out)");
    }
    const auto [n, k] = shape;
    const Tensor packed = nb::cast<Tensor>(entry[1]), su = nb::cast<Tensor>(entry[2]), sv = nb::cast<Tensor>(entry[3]);
    const int bits = nb::cast<int>(entry[6]);
    const std::string codebook = nb::cast<std::string>(entry[7]);
    const int64_t had_in = nb::cast<int64_t>(entry[8]), had_out = nb::cast<int64_t>(entry[9]);
    if (bits < 1 || bits > 8) value_error(fn, "bits must be in 1..8, got " + std::to_string(bits));
    const auto cb = mm::trellis::parse_codebook(codebook);
    if (!cb) value_error(fn, "unknown codebook '" + codebook + "'");
    if (n % 16 || k % 16) value_error(fn, "a trellis matrix needs multiples of 16, got " + std::to_string(n) + "x" +
                                              std::to_string(k));
    check_dtype(fn, "trellis", packed, Code::Int, 32, "int32");
    check_shape(fn, "trellis", packed, {n / 16, k / 16, 8 * bits});
    check_dtype(fn, "su", su, Code::Float, 16, "float16");
    check_shape(fn, "su", su, {k});
    check_dtype(fn, "sv", sv, Code::Float, 16, "float16");
    check_shape(fn, "sv", sv, {n});
    for (auto [label, block, size] : {std::tuple{"had_in", had_in, k}, std::tuple{"had_out", had_out, n}}) {
      if (block < 1 || (block & (block - 1)) || size % block) {
        value_error(fn, std::string(label) + "=" + std::to_string(block) + " must be a power of two dividing " +
                            std::to_string(size));
      }
    }
    kept_.insert(kept_.end(), {packed, su, sv});
    mm::cpu::DecoderLinear result;
    result.trellis = {static_cast<const uint32_t*>(packed.data()), static_cast<const uint16_t*>(su.data()),
                      static_cast<const uint16_t*>(sv.data()), n, k, bits, *cb, had_in, had_out};
    const Tensor bias = entry[4].is_none() ? Tensor() : nb::cast<Tensor>(entry[4]);
    result.bias = bias.is_valid() ? vector_of(fn, "bias", bias, n) : nullptr;
    return result;
  }

  mm::cpu::DecoderStack stack_;
  std::vector<Tensor> kept_;
};

NB_MODULE(_core, m) {
  m.doc() = "metal-marlin C++ kernels (CPU)";

  register_trellis_bindings(m);

  m.def("build_info", []() { return "cpu"; });

  // ---- Metal (macOS builds) ----
  m.def("has_metal", []() { return kHasMetal; },
        "Whether this build has the Metal kernels and their dispatch (the _core.metal submodule and "
        "metal_marlin.metallib): True for macOS builds (unless configured with METAL_MARLIN_METAL=OFF), False "
        "elsewhere. A build capability; whether an MPS device exists is torch.backends.mps.is_available().");
#ifdef METAL_MARLIN_METAL
  register_metal_bindings(m);
#endif
  // ---- end Metal ----

  nb::class_<DecoderStackBinding>(m, "DecoderStack",
                                  "The fused decode step of a dense GQA decoder stack (csrc/cpu/decoder_step.h).")
      .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, float>(), "hidden"_a, "heads"_a, "kv_heads"_a,
           "head_dim"_a, "intermediate"_a, "eps"_a)
      .def("add_layer", &DecoderStackBinding::add_layer, "input_norm"_a.noconvert(), "post_norm"_a.noconvert(),
           "q_norm"_a.noconvert().none(), "k_norm"_a.noconvert().none(), "linears"_a,
           "Appends a layer: norms (float32) and 7 linears (name, packed, scales, offsets, bias, format, "
           "group_size) for q, k, v, o, gate, up, down.")
      .def("decode", &DecoderStackBinding::decode, "hidden"_a.noconvert(), "cos"_a.noconvert(), "sin"_a.noconvert(),
           "keys"_a.noconvert(), "values"_a.noconvert(), "positions"_a.noconvert(),
           "key_mask"_a.noconvert().none() = nb::none(), "block_table"_a.noconvert().none() = nb::none(),
           "scaling"_a = 1.0f, "n_threads"_a = 1, "phase_seconds"_a.noconvert().none() = nb::none(),
           "One token per sequence through every layer, in place on hidden [batch, hidden]. Sequence b's "
           "token goes to cache position positions[b] (int32) and attends to the positions before it. keys/"
           "values: a contiguous cache [layers, batch, kv_heads, max_len, head_dim] with an optional key_mask "
           "[batch, max_len] (bool) of real positions, or a paged pool [layers, num_blocks, block_size, "
           "kv_heads, head_dim] with block_table [batch, width] (int32). phase_seconds (float64 [5], "
           "optional): seconds per phase (q/k/v, attention, o_proj, gate/up, down) are added to it.")
      .def_prop_ro("n_layers", &DecoderStackBinding::n_layers);

  m.def("simd_level", &mm::cpu::simd_level,
        "The CPU kernel path in effect: 'avx512_vnni', 'avx512', 'avx2' or 'scalar'. The process starts on the best "
        "path the CPU supports; set_simd_level changes it.");

  m.def("set_simd_level", &mm::cpu::set_simd_level, "level"_a,
        "Switches the CPU kernel path for the whole process: 'auto' (the best this CPU supports), "
        "'avx512_vnni', 'avx512', 'avx2' or 'scalar'. Returns the previous level (pass it back to restore). Raises "
        "ValueError for an unknown name or a path this CPU cannot run.");

  m.def("read_bandwidth_probe", &read_bandwidth_probe, "buffer"_a.noconvert(), "n_threads"_a,
        "Reads every byte of buffer (contiguous uint8 or int32) once with wide loads split over "
        "n_threads threads of the kernels' pool, and returns a checksum. Time it on a large buffer for "
        "this machine's streaming read bandwidth.");

  m.def("quant_matmul", &quant_matmul, "x"_a.noconvert(), "packed"_a.noconvert(), "scales"_a.noconvert(),
        "offsets"_a.noconvert().none(), "bias"_a.noconvert().none(), "out"_a.noconvert(), "format"_a,
        "group_size"_a, "n_threads"_a,
        "out = x @ dequant(W).T + bias, fused. x [M, K] float32/float16/bfloat16; packed int32 "
        "[N, K*bits/32]; scales (and offsets, integer formats only) float16 [N, ceil(K/group_size)]; "
        "bias None or [N] and out [M, N] in x's dtype. group_size is the group length, a multiple of 32 "
        "(K for per-channel; the last group is shorter when it does not divide K). Every element of "
        "out is written. Runs on n_threads threads.");

  m.def("moe_experts", &moe_experts, "hidden"_a.noconvert(), "top_k_index"_a.noconvert(),
        "top_k_weights"_a.noconvert(), "gate_up_packed"_a.noconvert(), "gate_up_scales"_a.noconvert(),
        "gate_up_offsets"_a.noconvert().none(), "down_packed"_a.noconvert(), "down_scales"_a.noconvert(),
        "down_offsets"_a.noconvert().none(), "out"_a.noconvert(), "format"_a, "group_size"_a, "n_threads"_a,
        "MoE SwiGLU experts, fused: out[t] = sum over slots s of top_k_weights[t, s] * down[e] @ (silu(gate) * "
        "up) with [gate, up] = gate_up[e] @ hidden[t], e = top_k_index[t, s]; e == E marks a slot to ignore. "
        "hidden [T, H] and out [T, H] float32/float16/bfloat16 (one dtype); top_k_index int64 [T, k] with "
        "values in [0, E]; top_k_weights float32 [T, k]; gate_up_* stacked [E, 2I, ...] and down_* [E, H, ...] "
        "as for quant_matmul, one format and group_size. float32 math; runs on n_threads threads.");

  m.def("dequantize", &dequantize, "packed"_a.noconvert(), "scales"_a.noconvert(), "offsets"_a.noconvert().none(),
        "out"_a.noconvert(), "format"_a, "group_size"_a,
        "Writes the dense float32 weight W [N, K] described by (packed, scales, offsets) into out.");
}
