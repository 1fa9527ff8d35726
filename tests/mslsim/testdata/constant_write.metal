// Planted bug: a write through a constant pointer (constant memory is read-only in MSL).
#include <metal_stdlib>
using namespace metal;

void bump(constant float* p) { p[0] += 1.0f; }

kernel void write_constant(constant float* table [[buffer(0)]], device float* y [[buffer(1)]]) {
  bump(table);
  y[0] = table[0];
}
