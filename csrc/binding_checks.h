// Argument checks shared by the Python bindings: every error names the function and the argument.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>
#include <vector>

namespace metal_marlin::bindings {

namespace nb = nanobind;

// Not convertible: a non-contiguous or non-CPU tensor is rejected instead of silently copied (a
// copy of `out` would swallow the result, a copy of the weights would cost a full read per call).
using Tensor = nb::ndarray<nb::device::cpu, nb::c_contig>;

inline std::string dtype_name(nb::dlpack::dtype dt) {
  using Code = nb::dlpack::dtype_code;
  std::string prefix;
  switch (Code(dt.code)) {
    case Code::Int: prefix = "int"; break;
    case Code::UInt: prefix = "uint"; break;
    case Code::Float: prefix = "float"; break;
    case Code::Bfloat: prefix = "bfloat"; break;
    case Code::Complex: prefix = "complex"; break;
    case Code::Bool: return "bool";
    default: prefix = "dtype" + std::to_string(int(dt.code)) + "_"; break;
  }
  return prefix + std::to_string(int(dt.bits));
}

inline bool has_dtype(const Tensor& t, nb::dlpack::dtype_code code, int bits) {
  const nb::dlpack::dtype dt = t.dtype();
  return dt.code == uint8_t(code) && dt.bits == bits && dt.lanes == 1;
}

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

inline std::vector<int64_t> shape_of(const Tensor& t) {
  std::vector<int64_t> shape(t.ndim());
  for (size_t i = 0; i < t.ndim(); ++i) shape[i] = int64_t(t.shape(i));
  return shape;
}

inline std::string shape_string(const Tensor& t) { return shape_string(shape_of(t)); }

[[noreturn]] inline void value_error(const char* fn, const std::string& message) {
  throw nb::value_error((std::string(fn) + ": " + message).c_str());
}

[[noreturn]] inline void type_error(const char* fn, const std::string& message) {
  throw nb::type_error((std::string(fn) + ": " + message).c_str());
}

inline void check_dtype(const char* fn, const char* name, const Tensor& t, nb::dlpack::dtype_code code, int bits,
                        const char* expected) {
  if (!has_dtype(t, code, bits)) {
    type_error(fn, std::string(name) + " must be " + expected + ", got " + dtype_name(t.dtype()));
  }
}

inline void check_shape(const char* fn, const char* name, const Tensor& t, const std::vector<int64_t>& shape) {
  if (shape_of(t) != shape) {
    value_error(fn, std::string(name) + " must have shape " + shape_string(shape) + ", got " + shape_string(t));
  }
}

inline void check_threads(const char* fn, int n_threads) {
  if (n_threads < 1) value_error(fn, "n_threads must be >= 1, got " + std::to_string(n_threads));
}

}  // namespace metal_marlin::bindings
