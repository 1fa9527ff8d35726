// The Metal dispatch (metal_runtime.h). Objective-C++ with manual reference counting, like the ATen
// MPS code whose header it includes.
//
// Ordering with PyTorch: every launch is encoded on PyTorch's own MPS stream, with the compute
// encoder the stream shares between its Metal kernels (MPSStream::commandEncoder), inside a block on
// the stream's serial dispatch queue (torch::mps::get_dispatch_queue). So our kernels run after the
// MPS work issued before them and before the work issued after them, tensors freed in between are
// reused safely by the caching allocator, and nothing here commits or waits.
//
// What this takes from torch (the risk): three exported functions, at::mps::getCurrentMPSStream,
// at::mps::MPSStream::commandEncoder (ATen's MPS headers are not a stable API) and
// torch::mps::get_dispatch_queue (public C++ API); no inline member or struct layout of torch is
// used, so the module needs those symbols, not the exact torch it was built against. Creating our own
// encoder on torch::mps::get_command_buffer() instead would crash with "A command encoder is already
// encoding to this command buffer" on torch versions whose get_command_buffer leaves the shared
// encoder open (before pytorch#164093). The encoder must only be fetched on the stream's queue
// (pytorch#198039 asserts it), which is where it is fetched here.
//
// Tensors arrive as MTLBuffer ids: for an MPS tensor torch's storage data pointer *is* the
// id<MTLBuffer> (ATen's getMTLBufferStorage casts it the same way) and the tensor starts
// storage_offset * element_size bytes into it.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#include <dlfcn.h>

#include <ATen/mps/MPSStream.h>
#include <torch/mps.h>

#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "metal/metal_runtime.h"

namespace metal_marlin::metal {
namespace {

// Metal's argument table has 31 buffer slots; setBytes takes at most 4 KiB; threadgroup memory
// lengths are multiples of 16 bytes; device-buffer offsets are aligned to the loaded type (<= 16).
constexpr uint32_t kBufferSlots = 31;
constexpr size_t kMaxBytes = 4096;
constexpr uint64_t kOffsetAlignment = 16;

uint32_t round_up_16(uint32_t n) { return (n + 15u) & ~15u; }

std::string describe(NSError* error) {
  return error != nil ? std::string([[error localizedDescription] UTF8String]) : std::string("no reason given");
}

id<MTLBuffer> as_buffer(uintptr_t handle) { return __builtin_bit_cast(id<MTLBuffer>, handle); }

// The metallib and one compute pipeline per kernel name, created on first use and kept (retained)
// for the life of the process. Pipelines are looked up under a mutex, so any thread may dispatch.
class KernelLibrary {
 public:
  // Loaded on first use; a failed load throws and the next call tries again.
  static KernelLibrary& instance() {
    static KernelLibrary library;
    return library;
  }

  id<MTLDevice> device() const { return device_; }

  id<MTLComputePipelineState> pipeline(const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto found = pipelines_.find(name); found != pipelines_.end()) return found->second;
    std::string error;
    id<MTLComputePipelineState> state = nil;
    @autoreleasepool {
      id<MTLFunction> function = [library_ newFunctionWithName:@(name.c_str())];
      if (function == nil) {
        error = "kernel '" + name + "' is not in " + library_path();
      } else {
        NSError* ns_error = nil;
        state = [device_ newComputePipelineStateWithFunction:function error:&ns_error];
        [function release];
        if (state == nil) error = "cannot build the pipeline of kernel '" + name + "': " + describe(ns_error);
      }
    }
    if (!error.empty()) throw std::invalid_argument("metal_marlin: " + error);
    pipelines_.emplace(name, state);
    return state;
  }

  std::vector<std::string> names() const {
    std::vector<std::string> result;
    @autoreleasepool {
      for (NSString* name in [library_ functionNames]) result.emplace_back([name UTF8String]);
    }
    return result;
  }

 private:
  KernelLibrary() {
    const std::string path = library_path();
    std::string error;
    @autoreleasepool {
      // The system default device is the GPU PyTorch's MPS backend uses on Apple silicon; dispatch()
      // checks that the stream's encoder belongs to it.
      device_ = MTLCreateSystemDefaultDevice();
      if (device_ == nil) {
        error = "no Metal device";
      } else {
        NSError* ns_error = nil;
        library_ = [device_ newLibraryWithURL:[NSURL fileURLWithPath:@(path.c_str())] error:&ns_error];
        if (library_ == nil) {
          error = "cannot load " + path + ": " + describe(ns_error);
          [device_ release];
        }
      }
    }
    if (!error.empty()) throw std::runtime_error("metal_marlin: " + error);
  }

  std::mutex mutex_;
  id<MTLDevice> device_ = nil;
  id<MTLLibrary> library_ = nil;
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines_;
};

[[noreturn]] void launch_error(const Launch& launch, const std::string& message) {
  throw std::invalid_argument("metal_marlin: kernel " + launch.kernel + ": " + message);
}

// Everything the encoder would otherwise take silently (or abort the process on): checked before the
// stream's queue is entered.
void check_launch(const Launch& launch, id<MTLComputePipelineState> state, id<MTLDevice> device) {
  uint64_t threads = 1;
  for (int axis = 0; axis < 3; ++axis) {
    if (launch.grid[axis] == 0 || launch.threadgroup[axis] == 0) {
      launch_error(launch, "grid and threadgroup sizes must be >= 1 on every axis");
    }
    threads *= launch.threadgroup[axis];
  }
  if (threads > [state maxTotalThreadsPerThreadgroup]) {
    launch_error(launch, std::to_string(threads) + " threads per threadgroup; the pipeline allows " +
                             std::to_string([state maxTotalThreadsPerThreadgroup]));
  }
  uint64_t memory = [state staticThreadgroupMemoryLength];
  for (const ThreadgroupMemory& m : launch.threadgroup_memory) memory += round_up_16(m.length);
  if (memory > [device maxThreadgroupMemoryLength]) {
    launch_error(launch, std::to_string(memory) + " bytes of threadgroup memory; the device has " +
                             std::to_string([device maxThreadgroupMemoryLength]));
  }
  std::unordered_set<uint32_t> slots;
  auto claim = [&](uint32_t index) {
    if (index >= kBufferSlots || !slots.insert(index).second) {
      launch_error(launch, "buffer index " + std::to_string(index) + " is out of range or bound twice");
    }
  };
  for (const BytesBinding& b : launch.bytes) {
    claim(b.index);
    if (b.bytes.empty() || b.bytes.size() > kMaxBytes) {
      launch_error(launch, "constant argument " + std::to_string(b.index) + " has " + std::to_string(b.bytes.size()) +
                               " bytes; setBytes takes 1 to 4096");
    }
  }
  for (const BufferBinding& b : launch.buffers) {
    claim(b.index);
    if (b.buffer == 0) launch_error(launch, "buffer " + std::to_string(b.index) + " is null");
    if (b.offset % kOffsetAlignment != 0) {
      launch_error(launch, "buffer " + std::to_string(b.index) + " starts at byte offset " + std::to_string(b.offset) +
                               ", not a multiple of 16");
    }
    const uint64_t capacity = [as_buffer(b.buffer) length];
    if (b.offset > capacity || b.length > capacity - b.offset) {
      launch_error(launch, "buffer " + std::to_string(b.index) + " range [" + std::to_string(b.offset) + ", " +
                               std::to_string(b.offset + b.length) + ") exceeds its MTLBuffer of " +
                               std::to_string(capacity) + " bytes");
    }
  }
}

void encode(id<MTLComputeCommandEncoder> encoder, const Launch& launch, id<MTLComputePipelineState> state) {
  [encoder setComputePipelineState:state];
  for (const BufferBinding& b : launch.buffers) {
    [encoder setBuffer:as_buffer(b.buffer) offset:b.offset atIndex:b.index];
  }
  for (const BytesBinding& b : launch.bytes) {
    [encoder setBytes:b.bytes.data() length:b.bytes.size() atIndex:b.index];
  }
  for (const ThreadgroupMemory& m : launch.threadgroup_memory) {
    [encoder setThreadgroupMemoryLength:round_up_16(m.length) atIndex:m.index];
  }
  [encoder dispatchThreadgroups:MTLSizeMake(launch.grid[0], launch.grid[1], launch.grid[2])
          threadsPerThreadgroup:MTLSizeMake(launch.threadgroup[0], launch.threadgroup[1], launch.threadgroup[2])];
}

}  // namespace

std::string library_path() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&library_path), &info) == 0 || info.dli_fname == nullptr) {
    throw std::runtime_error("metal_marlin: cannot locate the _core module to find metal_marlin.metallib");
  }
  const std::string module = info.dli_fname;
  return module.substr(0, module.find_last_of('/') + 1) + "metal_marlin.metallib";
}

std::vector<std::string> kernel_names() { return KernelLibrary::instance().names(); }

void dispatch(const std::vector<Launch>& launches) {
  if (launches.empty()) return;
  KernelLibrary& library = KernelLibrary::instance();
  // Pipelines are built (a compile from the metallib, first call only) before entering PyTorch's queue.
  std::vector<id<MTLComputePipelineState>> states;
  states.reserve(launches.size());
  for (const Launch& launch : launches) {
    states.push_back(library.pipeline(launch.kernel));
    check_launch(launch, states.back(), library.device());
  }

  // Blocks copy what they capture: pass pointers to the locals (dispatch_sync returns after the block).
  const std::vector<Launch>* plan = &launches;
  const std::vector<id<MTLComputePipelineState>>* pipelines = &states;
  id<MTLDevice> device = library.device();
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  std::exception_ptr failure;
  std::exception_ptr* failure_out = &failure;
  bool wrong_device = false;
  bool* wrong_device_out = &wrong_device;
  dispatch_sync(torch::mps::get_dispatch_queue(), ^{
    // No C++ exception may leave a dispatch block.
    try {
      @autoreleasepool {
        id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
        if ([encoder device] != device) {
          *wrong_device_out = true;
        } else {
          for (size_t i = 0; i < plan->size(); ++i) encode(encoder, (*plan)[i], (*pipelines)[i]);
        }
      }
    } catch (...) {
      *failure_out = std::current_exception();
    }
  });
  if (failure) std::rethrow_exception(failure);
  if (wrong_device) {
    throw std::runtime_error("metal_marlin: PyTorch's MPS stream is on another GPU than the system default device");
  }
}

}  // namespace metal_marlin::metal
