// The Metal dispatch of metal_marlin (macOS only): loads metal_marlin.metallib, keeps one compute
// pipeline per kernel name, and encodes kernels on PyTorch's MPS stream. Plain C++ interface (no
// Objective-C or torch types) so the nanobind bindings can include it; metal_runtime.mm implements it.
//
// What to launch is decided in Python (metal_marlin/ops/metal.py and the ops beside it): the kernel
// host name, the grid, the buffers, the parameter structs and the threadgroup memory. This layer
// checks what it can see (the kernel exists, sizes fit the pipeline and the device, every buffer
// range lies inside its MTLBuffer) and encodes.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace metal_marlin::metal {

// A device buffer: the MTLBuffer of an MPS tensor's storage (its id, as torch's
// `untyped_storage().data_ptr()` returns it for MPS tensors), the byte offset of the tensor in it
// and the number of bytes the kernel may touch from there.
struct BufferBinding {
  uint32_t index;  // [[buffer(index)]]
  uintptr_t buffer;
  uint64_t offset;
  uint64_t length;
};

// A `constant T&` argument set with setBytes (a parameter struct, at most 4 KiB).
struct BytesBinding {
  uint32_t index;  // [[buffer(index)]]
  std::string bytes;
};

// Bytes for a `threadgroup T*` kernel argument.
struct ThreadgroupMemory {
  uint32_t index;  // [[threadgroup(index)]]
  uint32_t length;
};

struct Launch {
  std::string kernel;                 // host name in the metallib
  std::array<uint32_t, 3> grid;       // threadgroups (dispatchThreadgroups)
  std::array<uint32_t, 3> threadgroup;  // threads per threadgroup
  std::vector<BufferBinding> buffers;
  std::vector<BytesBinding> bytes;
  std::vector<ThreadgroupMemory> threadgroup_memory;
};

// Encodes the launches, in order, on PyTorch's MPS stream (after every MPS op already issued, before
// every later one). Does not commit or wait: like PyTorch's own kernels, the work runs when the stream
// is next committed (a sync, a .cpu(), an MPSGraph op). Throws std::invalid_argument for a launch the
// pipeline or the device cannot take, std::runtime_error if the library cannot be loaded.
void dispatch(const std::vector<Launch>& launches);

// Host names of every kernel in the metallib.
std::vector<std::string> kernel_names();

// Where the metallib is looked for: metal_marlin.metallib beside the _core module.
std::string library_path();

}  // namespace metal_marlin::metal
