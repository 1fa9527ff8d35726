// Planted bug: a C-style vector cast, which clang would compile as a bit reinterpretation.
#include <metal_stdlib>
using namespace metal;

kernel void c_style_cast(const device uint4* u [[buffer(0)]], device float4* y [[buffer(1)]],
                         uint i [[thread_position_in_grid]]) {
  y[i] = (float4)u[i];
}
