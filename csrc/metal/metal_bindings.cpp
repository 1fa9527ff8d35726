// _core.metal: the Metal dispatch as Python functions (macOS builds only; csrc/bindings.cpp calls
// register_metal_bindings). The launch plans come from metal_marlin/ops/metal.py.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "metal/metal_runtime.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace mt = metal_marlin::metal;

// The Python form of a launch (metal_marlin.ops.metal.Launch.as_core_args).
using BufferArg = std::tuple<uint32_t, uintptr_t, uint64_t, uint64_t>;  // index, MTLBuffer id, offset, bytes
using BytesArg = std::tuple<uint32_t, nb::bytes>;                      // index, struct bytes
using MemoryArg = std::tuple<uint32_t, uint32_t>;                      // index, bytes
using LaunchArg = std::tuple<std::string, std::array<uint32_t, 3>, std::array<uint32_t, 3>, std::vector<BufferArg>,
                             std::vector<BytesArg>, std::vector<MemoryArg>>;

mt::Launch to_launch(const LaunchArg& arg) {
  const auto& [kernel, grid, threadgroup, buffers, bytes, memory] = arg;
  mt::Launch launch{kernel, grid, threadgroup, {}, {}, {}};
  for (const auto& [index, buffer, offset, length] : buffers) launch.buffers.push_back({index, buffer, offset, length});
  for (const auto& [index, data] : bytes) launch.bytes.push_back({index, std::string(data.c_str(), data.size())});
  for (const auto& [index, length] : memory) launch.threadgroup_memory.push_back({index, length});
  return launch;
}

void dispatch(const std::vector<LaunchArg>& args) {
  std::vector<mt::Launch> launches;
  launches.reserve(args.size());
  for (const LaunchArg& arg : args) launches.push_back(to_launch(arg));
  // Released while waiting for PyTorch's MPS queue, which another thread may be holding.
  nb::gil_scoped_release release;
  mt::dispatch(launches);
}

}  // namespace

void register_metal_bindings(nb::module_& m) {
  nb::module_ metal = m.def_submodule("metal", "Metal kernels on PyTorch's MPS stream (macOS builds)");

  metal.def("dispatch", &dispatch, "launches"_a,
            "Encodes the launches, in order, on PyTorch's MPS stream (no commit, no wait). Each launch is "
            "(kernel, grid, threadgroup, buffers, constants, threadgroup_memory): the kernel host name, "
            "threadgroups per grid and threads per threadgroup (3 ints each), (index, MTLBuffer id, byte "
            "offset, bytes used) per device buffer, (index, bytes) per constant struct, (index, bytes) per "
            "threadgroup-memory argument. Raises ValueError for a kernel missing from the metallib or a "
            "launch the pipeline, the device or a buffer cannot take.");

  metal.def("kernel_names", &mt::kernel_names, "Host names of every kernel in metal_marlin.metallib.");

  metal.def("library_path", &mt::library_path, "Path of the metallib: metal_marlin.metallib beside _core.");
}
