// Kernels for tests/metal/test_mslsim.py: each exercises one part of the simulated MSL library.
#include <metal_stdlib>
using namespace metal;

struct VectorParams {
  uint n;
  float scale;
};

// Swizzles, constructors, conversions and reinterpretation; out has 8 float4 per element.
kernel void vectors(const device float4* a [[buffer(0)]], const device uint4* u [[buffer(1)]],
                    device float4* out [[buffer(2)]], constant VectorParams& p [[buffer(3)]],
                    uint i [[thread_position_in_grid]]) {
  if (i >= p.n) return;
  float4 x = a[i];
  device float4* o = out + 8 * i;
  o[0] = x.wzyx;
  o[1] = float4(x.xy, x.zw * 2.0);
  o[2] = float4(u[i]);
  o[3] = as_type<float4>(u[i]);
  o[4] = float4(half4(x));
  o[5] = float4(static_cast<int4>(x));
  o[6] = select(float4(p.scale), x, x > 0.0f);
  float4 y = x;
  y.yw = float2(dot(x, x), length(x.xy));
  o[7] = y;
}

// half arithmetic, each operation rounded to half; out[i * 6 + k].
kernel void half_ops(const device half* a [[buffer(0)]], const device half* b [[buffer(1)]],
                     const device half* c [[buffer(2)]], device half* out [[buffer(3)]],
                     uint i [[thread_position_in_grid]]) {
  half x = a[i], y = b[i], z = c[i];
  device half* o = out + 6 * i;
  o[0] = x * y + z;
  o[1] = (x + y) * z - x;
  o[2] = x / y;
  o[3] = sqrt(abs(x));
  o[4] = fma(x, y, z);
  o[5] = x * 0.1h + y * 3.0h;
}

// Conversions between float, half and integers.
kernel void conversions(const device float* f [[buffer(0)]], const device int* n [[buffer(1)]],
                        device half* to_half [[buffer(2)]], device float* from_half [[buffer(3)]],
                        device int* to_int [[buffer(4)]], device half* int_to_half [[buffer(5)]],
                        uint i [[thread_position_in_grid]]) {
  to_half[i] = half(f[i]);
  from_half[i] = float(to_half[i]);
  to_int[i] = int(f[i]);
  int_to_half[i] = static_cast<half>(n[i]);
}

// Every simd collective, with a partial last simdgroup (48 threads: 32 + 16); out[tid * 12 + k].
kernel void collectives(const device float* x [[buffer(0)]], const device ushort* source [[buffer(1)]],
                        device float* out [[buffer(2)]], device ulong* ballots [[buffer(3)]],
                        uint tid [[thread_position_in_grid]], ushort lane [[thread_index_in_simdgroup]]) {
  float v = x[tid];
  device float* o = out + 12 * tid;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_prefix_inclusive_sum(v);
  o[4] = simd_prefix_exclusive_sum(v);
  o[5] = simd_shuffle(v, source[tid]);
  o[6] = simd_shuffle_xor(v, 5);
  o[7] = simd_shuffle_up(v, 3);
  o[8] = simd_shuffle_down(v, 3);
  o[9] = simd_broadcast(v, 2);
  o[10] = simd_any(v > 2.0f) ? 1.0f : 0.0f;
  o[11] = simd_all(v > -2.0f) ? 1.0f : 0.0f;
  ballots[tid] = static_cast<ulong>(simd_ballot(v > 0.0f));
  if (lane < 3) return;  // the remaining lanes are the active ones
  o[0] = simd_broadcast_first(v);
  o[1] = simd_sum(v);
}

// simdgroup_matrix: D = A * B + C with B loaded transposed from Bt and C from threadgroup memory, the thread
// elements of A, a strided load with an origin, diagonal and filled constructors, and a half x half -> float
// product. One simdgroup.
kernel void matrices(const device float* A [[buffer(0)]], const device float* Bt [[buffer(1)]],
                     const device float* C [[buffer(2)]], const device float* wide [[buffer(3)]],
                     const device half* Ah [[buffer(4)]], const device half* Bh [[buffer(5)]],
                     device float* D [[buffer(6)]], device float* elements [[buffer(7)]],
                     device float* extra [[buffer(8)]], ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup float Cs[64];
  Cs[lane] = C[lane];
  Cs[lane + 32] = C[lane + 32];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 a, b, c, d;
  simdgroup_load(a, A);
  simdgroup_load(b, Bt, 8, ulong2(0, 0), true);
  simdgroup_load(c, Cs);
  simdgroup_multiply_accumulate(d, a, b, c);
  simdgroup_store(d, D);
  elements[2 * lane] = a.thread_elements()[0];
  elements[2 * lane + 1] = a.thread_elements()[1];
  simdgroup_float8x8 w;
  simdgroup_load(w, wide, 12, ulong2(3, 1));
  simdgroup_store(w, extra);
  simdgroup_store(simdgroup_float8x8(2.0f), extra + 64);
  simdgroup_store(make_filled_simdgroup_matrix<float, 8, 8>(3.0f), extra + 128);
  simdgroup_half8x8 ah, bh;
  simdgroup_load(ah, Ah);
  simdgroup_load(bh, Bh);
  simdgroup_float8x8 p;
  simdgroup_multiply(p, ah, bh);
  simdgroup_store(p, extra + 192, 8, ulong2(0, 0), true);
}

// Atomics in device and threadgroup memory; 64 threads per threadgroup.
kernel void atomics(const device uint* x [[buffer(0)]], device atomic_uint* counter [[buffer(1)]],
                    device atomic_uint* maximum [[buffer(2)]], device atomic_float* total [[buffer(3)]],
                    device uint* histograms [[buffer(4)]], device atomic_int* exchanged [[buffer(5)]],
                    uint tid [[thread_position_in_grid]], uint lid [[thread_index_in_threadgroup]],
                    uint group [[threadgroup_position_in_grid]]) {
  threadgroup atomic_uint bins[8];
  if (lid < 8) atomic_store_explicit(&bins[lid], 0, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
  atomic_fetch_max_explicit(maximum, x[tid], memory_order_relaxed);
  atomic_fetch_add_explicit(total, float(x[tid] % 4), memory_order_relaxed);
  atomic_fetch_add_explicit(&bins[x[tid] % 8], 1, memory_order_relaxed);
  int expected = atomic_load_explicit(exchanged, memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(exchanged, &expected, expected + int(x[tid] % 3),
                                                memory_order_relaxed, memory_order_relaxed)) {
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid < 8) histograms[group * 8 + lid] = atomic_load_explicit(&bins[lid], memory_order_relaxed);
}

// Row sums: a strided loop per thread, then a tree in threadgroup memory (64 threads, one row each group).
kernel void row_sums(const device float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     constant uint& length [[buffer(2)]], uint lid [[thread_index_in_threadgroup]],
                     uint row [[threadgroup_position_in_grid]]) {
  threadgroup float partial[64];
  float sum = 0.0f;
  for (uint k = lid; k < length; k += 64) sum += x[row * length + k];
  partial[lid] = sum;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = 32; stride > 0; stride /= 2) {
    if (lid < stride) partial[lid] += partial[lid + stride];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (lid == 0) out[row] = partial[0];
}

// Transpose through a 16x17 tile in dynamic threadgroup memory ([[threadgroup(0)]]), ragged edges.
kernel void transpose(const device half* x [[buffer(0)]], device half* y [[buffer(1)]],
                      constant uint2& shape [[buffer(2)]], threadgroup half* tile [[threadgroup(0)]],
                      uint2 lid [[thread_position_in_threadgroup]], uint2 group [[threadgroup_position_in_grid]]) {
  uint r = group.y * 16 + lid.y, c = group.x * 16 + lid.x;
  if (r < shape.x && c < shape.y) tile[lid.y * 17 + lid.x] = x[r * shape.y + c];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint tr = group.x * 16 + lid.y, tc = group.y * 16 + lid.x;
  if (tr < shape.y && tc < shape.x) y[tr * shape.x + tc] = tile[lid.x * 17 + lid.y];
}

// Every thread-position attribute; out[thread, k] for the 3-D grid.
[[host_name("positions")]] kernel void thread_positions(
    device uint* out [[buffer(0)]], uint3 grid_pos [[thread_position_in_grid]],
    ushort3 local [[thread_position_in_threadgroup]], uint3 group [[threadgroup_position_in_grid]],
    uint3 tg_size [[threads_per_threadgroup]], uint3 groups [[threadgroups_per_grid]],
    uint3 grid_size [[threads_per_grid]], uint index [[thread_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]], uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint simdgroups [[simdgroups_per_threadgroup]], uint width [[threads_per_simdgroup]]) {
  uint linear = (grid_pos.z * grid_size.y + grid_pos.y) * grid_size.x + grid_pos.x;
  device uint* o = out + 20 * linear;
  uint values[20] = {grid_pos.x, grid_pos.y, grid_pos.z, local.x, local.y, local.z, group.x, group.y, group.z,
                     tg_size.x, tg_size.y, tg_size.z, groups.x, groups.y, groups.z, index, lane, simdgroup,
                     simdgroups, width};
  for (int k = 0; k < 20; ++k) o[k] = values[k];
}

// Templated kernels instantiated through a macro, the way the project's shaders name them.
template <typename T, int Factor>
[[kernel]] void scale(device T* y [[buffer(0)]], const device T* x [[buffer(1)]], uint i [[thread_position_in_grid]]) {
  y[i] = x[i] * T(Factor);
}
#define INSTANTIATE_SCALE(name, T, factor) \
  template [[host_name(#name)]] [[kernel]] decltype(scale<T, factor>) scale<T, factor>;
INSTANTIATE_SCALE(scale_half_by_3, half, 3)
INSTANTIATE_SCALE(scale_float_by_5, float, 5)

// Source forms the rewriter has to handle: vector typedefs and aliases used as constructors, metal::
// qualified types, a threadgroup declaration from a macro, one spanning lines and one with two declarators,
// patterns inside comments and strings, a conversion operator, a program-scope constant table, literals.
typedef vec<half, 4> h4;
using f2 = float2;
#define DECLARE_TILE(name, n) threadgroup float name[n];
struct Accumulator {
  float value;
  operator float() const { return value; }
};
constant float table[3] = {0.5, 1.5, 2.5};
constant char text[] = "(float4)x float4(1) 1.5h threadgroup float z[3];";
kernel void rewrites(device float* y [[buffer(0)]], const device half* x [[buffer(1)]],
                     uint lid [[thread_index_in_threadgroup]]) {
  DECLARE_TILE(tile, 64)
  threadgroup float wide[2][
      32];
  threadgroup float a[4], b[4];
  h4 v = h4(x[lid], 1.0h, 2, 3.5);  // not (float4)v, nor float4(1) 1.5h
  f2 w = f2(v.xy);
  metal::float4 q = metal::float4(w, w);
  Accumulator acc = {q.w + table[1]};
  tile[lid] = float(acc) + float(vec<half, 2>(v.zw).x) + float(text[0] == '(');
  wide[lid / 32][lid % 32] = w.x;
  if (lid < 4) {
    a[lid] = 1e-1;
    b[lid] = .5;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = tile[lid] + wide[lid / 32][lid % 32] + a[lid % 4] + b[lid % 4];
}

// Integer bit functions on uint and int (and short/uchar widths); out[i * 16 + k].
kernel void bit_functions(const device uint* u [[buffer(0)]], const device uint* v [[buffer(1)]],
                          device uint* out [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  uint x = u[i], y = v[i];
  int s = as_type<int>(x);
  uint offset = y % 16, bits = y % 17;
  device uint* o = out + 16 * i;
  o[0] = popcount(x);
  o[1] = clz(x);
  o[2] = ctz(x);
  o[3] = reverse_bits(x);
  o[4] = rotate(x, y);
  o[5] = mulhi(x, y);
  o[6] = extract_bits(x, offset, bits);
  o[7] = as_type<uint>(extract_bits(s, offset, bits));
  o[8] = insert_bits(x, y, offset, bits);
  o[9] = absdiff(s, as_type<int>(y));
  o[10] = as_type<uint>(mulhi(s, as_type<int>(y)));
  o[11] = uint(clz(ushort(x)));
  o[12] = uint(popcount(uchar(x)));
  o[13] = uint(ctz(ushort(x)));
  o[14] = max(x, y) - min(x, y);
  o[15] = uint(clamp(s, -1000, 1000) + 1000);
}

// float and half math, scalar and vector forms; out[i * 12 + k] as float.
kernel void math_functions(const device float* x [[buffer(0)]], device float* out [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
  float a = x[i];
  half h = half(a);
  float2 v = float2(a, -a);
  device float* o = out + 12 * i;
  o[0] = exp(a);
  o[1] = exp2(a);
  o[2] = log(abs(a) + 1.0f);
  o[3] = rsqrt(abs(a) + 1.0f);
  o[4] = precise::sqrt(abs(a));
  o[5] = fast::tanh(a);
  o[6] = float(exp(h));
  o[7] = float(max(h, half(0)));
  o[8] = clamp(v, -0.5f, 0.25f).y;
  o[9] = fract(a);
  o[10] = metal::numeric_limits<half>::max() + float(metal::is_floating_point_v<half>);
  o[11] = (isnan(a / 0.0f) || isinf(a / 0.0f)) ? 1.0f : 0.0f;
}
