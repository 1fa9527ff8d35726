// Planted bug: a device pointer passed where a threadgroup pointer is expected.
#include <metal_stdlib>
using namespace metal;

void stage(threadgroup float* tile, uint i, float v) { tile[i] = v; }

kernel void pass_device_as_threadgroup(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  stage(y, i, 1.0f);
}
