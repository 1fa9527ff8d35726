// Kernels with planted bugs that the simulator must catch (tests/metal/test_mslsim.py), each beside a correct
// variant where one makes sense.
#include <metal_stdlib>
using namespace metal;

// Shared-memory tree reduction of 128 values per threadgroup; Barrier=false drops the barrier in the loop.
template <bool Barrier>
[[kernel]] void tree_sum(const device float* x [[buffer(0)]], device float* out [[buffer(1)]],
                         uint lid [[thread_index_in_threadgroup]], uint group [[threadgroup_position_in_grid]]) {
  threadgroup float partial[128];
  partial[lid] = x[group * 128 + lid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = 64; stride > 0; stride /= 2) {
    if (lid < stride) partial[lid] += partial[lid + stride];
    if (Barrier) threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (lid == 0) out[group] = partial[0];
}
template [[host_name("tree_sum")]] [[kernel]] decltype(tree_sum<true>) tree_sum<true>;
template [[host_name("tree_sum_no_barrier")]] [[kernel]] decltype(tree_sum<false>) tree_sum<false>;

// Tiles through threadgroup memory; each simdgroup sums the other simdgroup's half of the tile. WarBarrier=false
// drops the barrier between reading a tile and overwriting it with the next (a write-after-read race that
// only shows when one simdgroup runs ahead: in step, every read happens before the simd_sum completes).
template <bool WarBarrier>
[[kernel]] void tile_sums(const device float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          constant uint& tiles [[buffer(2)]], uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  float total = 0.0f;
  for (uint t = 0; t < tiles; ++t) {
    tile[lid] = x[t * 64 + lid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    total += simd_sum(tile[(lid + 32) % 64]);
    if (WarBarrier) threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[lid] = total;
}
template [[host_name("tile_sums")]] [[kernel]] decltype(tile_sums<true>) tile_sums<true>;
template [[host_name("tile_sums_no_war_barrier")]] [[kernel]] decltype(tile_sums<false>) tile_sums<false>;

// Writes one element past the end of its buffer.
kernel void write_past_end(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  y[i + 1] = 1.0f;
}

// Writes one element before the start of its buffer.
kernel void write_before_start(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  y[int(i) - 1] = 1.0f;
}

// A barrier that only half the simdgroup reaches.
kernel void divergent_barrier(device float* y [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  if (lid < 16) threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = 1.0f;
}

// Threads past the end return before the barrier the others wait at.
kernel void return_before_barrier(device float* y [[buffer(0)]], constant uint& n [[buffer(1)]],
                                  uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float staged[64];
  if (lid >= n) return;
  staged[lid] = float(lid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = staged[n - 1 - lid];
}

// 2 x 16 KiB + 16 bytes of threadgroup arrays.
kernel void too_much_threadgroup_memory(device float* y [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float a[4096];
  threadgroup float b[4100];
  a[lid] = 1.0f;
  b[lid] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = a[lid] + b[lid];
}

// 16 KiB of static threadgroup memory; the test adds dynamic threadgroup memory.
kernel void static_plus_dynamic(device float* y [[buffer(0)]], threadgroup float* extra [[threadgroup(0)]],
                                uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float a[4096];
  a[lid] = 1.0f;
  extra[lid] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = a[lid] + extra[lid];
}

// Half the simdgroup calls simd_sum, the other half simd_max.
kernel void divergent_collective(device float* y [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  y[lane] = lane < 16 ? simd_sum(1.0f) : simd_max(2.0f);
}

// Waits for a flag nobody sets.
kernel void spin_forever(device atomic_uint* flag [[buffer(0)]]) {
  while (atomic_load_explicit(flag, memory_order_relaxed) == 0) {
  }
}

// Each thread reads its neighbour's uninitialised threadgroup slot: poison (NaN) in every schedule.
kernel void read_uninitialised(device float* y [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float staged[64];
  if (lid % 2 == 0) staged[lid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = staged[lid ^ 1];
}

// 1.2 MB of thread-local array: more than a simulated thread's stack.
kernel void huge_locals(device float* y [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  float big[300000];
  for (int i = 0; i < 300000; ++i) big[i] = float(i + int(lid));
  y[lid] = big[lid * 7];
}

// Integer division by zero in thread 3.
kernel void divide_by_zero(device int* y [[buffer(0)]], uint lid [[thread_index_in_threadgroup]]) {
  y[lid] = 10 / (int(lid) - 3);
}

// Every threadgroup writes its index to the same element: the result depends on the threadgroup order.
kernel void same_element(device uint* y [[buffer(0)]], uint group [[threadgroup_position_in_grid]]) {
  y[0] = group;
}

// A shuffle mask that differs between lanes (Metal requires it to be uniform).
kernel void nonuniform_shuffle(device float* y [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
  y[lane] = simd_shuffle_xor(float(lane), ushort(lane % 2 + 1));
}
