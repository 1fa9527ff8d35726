// Blockwise normalised Sylvester Hadamard transforms of the last dimension (docs/formats.md,
// "Hadamard transforms"; reference: metal_marlin.ops.hadamard): every block of B consecutive
// elements of a row is multiplied by H_B / sqrt(B), H_B[i, j] = (-1)^popcount(i & j). Dimensions such
// as 576 = 9 x 64 are simply 9 blocks of 64 (the format picks the largest power-of-two block dividing
// the dimension), so every block here is a power of two, B = 1 .. 512 (one instantiation each; the
// quantizer's default cap is 128).
//
// Tile: one threadgroup of 128 threads (4 simdgroups) transforms a chunk of 512 consecutive elements
// of the flattened [rows, n] tensor (blocks never straddle rows since B divides n). Thread t holds
// elements 4t .. 4t+3 in registers, so index bits 0-1 are butterflies inside the thread, bits 2-6 are
// simd_shuffle_xor butterflies across lanes (masks 1..16), and bits 7-8 (B = 256, 512) go through
// 2 KiB of threadgroup memory: after one barrier thread t gathers the 4/H blocks x H elements that
// share its low 7 bits (H = B/128) and finishes with in-thread butterflies. No barrier at all for
// B <= 128. 4 elements per thread keep 512 elements per threadgroup with log2(B) adds per element;
// the pass is bandwidth-bound, and many small threadgroups keep all cores busy even for one row.
// The 1/sqrt(B) normalisation is one multiply by a float32 constant at the end.
//
// Kernels:
//   hadamard_<half|float>_<B>: y = hadamard_B(x) (the op on half or float32 activations).
//   hadamard_in_<B>:  xs (float32) = hadamard_B(x * su), x and su half: the input side of trellis_matmul.
//   hadamard_out_<B>: y (half) = hadamard_B(z) * sv + bias, z float32, sv and bias half: the output side.
// bandwidth model: hadamard_half: 2 bytes read + 2 written per element; hadamard_float: 4 + 4;
//   hadamard_in: 2 + 4 (+ su from cache); hadamard_out: 4 + 2 (+ sv, bias from cache). log2(B) adds
//   per element are far below the ALU budget, so memory-bound at ~80-90% of peak for tensors of
//   >= 64 KiB; at decode (one row of 4096: 8 threadgroups) the pass costs its launch latency
//   (~5 us), so the host encodes the three trellis dispatches back to back in one encoder.
#include <metal_stdlib>

using namespace metal;

// Scalar parameters of every kernel here (32-bit fields only).
struct HadamardParams {
  uint rows;      // product of the leading dimensions
  uint n;         // last dimension, a multiple of the block
  uint has_bias;  // hadamard_out only: add bias (else the bias buffer is not read)
};

constant constexpr uint kHadamardThreads = 128;
constant constexpr uint kHadamardChunk = 4 * kHadamardThreads;

// 1/sqrt(b) for a power of two b, as the float32 constant the reference's float32 matrix holds.
constexpr float hadamard_norm(uint b) {
  float s = 1.0f;
  for (; b >= 4; b /= 4) {
    s *= 0.5f;
  }
  return b == 2 ? s * 0.70710678118654752f : s;
}

// Butterflies on bit 0 (pairs 0-1, 2-3) and, for bits = 2, bit 1 (pairs 0-2, 1-3) of the value index.
inline float4 hadamard_in_thread(float4 v, uint bits) {
  if (bits >= 1) {
    v = float4(v.x + v.y, v.x - v.y, v.z + v.w, v.z - v.w);
  }
  if (bits >= 2) {
    v = float4(v.x + v.z, v.y + v.w, v.x - v.z, v.y - v.w);
  }
  return v;
}

// Chunk-relative index of value r of thread tid after hadamard_chunk (transposed for B > 128).
template <uint B>
inline uint hadamard_index(uint tid, uint r) {
  if (B > 128) {
    constexpr uint per_block = B > 128 ? B / 128 : 1;  // H: values of one block per thread
    return (r / per_block) * B + (r % per_block) * 128 + tid;
  }
  return 4 * tid + r;
}

// Transforms v = elements 4*tid .. 4*tid+3 of a 512-element chunk held by the whole threadgroup.
// All 128 threads must call it (shuffles, and a barrier for B > 128).
template <uint B>
inline float4 hadamard_chunk(float4 v, uint tid, uint lane, threadgroup float* exchange) {
  static_assert(B >= 1 && B <= 512 && (B & (B - 1)) == 0, "block must be a power of two up to 512");
  v = hadamard_in_thread(v, B > 2 ? 2 : (B > 1 ? 1 : 0));
#pragma clang loop unroll(full)
  for (ushort mask = 1; mask < 32; mask <<= 1) {
    if (4u * mask < B) {
      const float4 other = simd_shuffle_xor(v, mask);
      v = (lane & mask) ? other - v : v + other;
    }
  }
  if (B > 128) {
    for (uint r = 0; r < 4; ++r) {
      exchange[4 * tid + r] = v[r];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = 0; r < 4; ++r) {
      v[r] = exchange[hadamard_index<B>(tid, r)];
    }
    v = hadamard_in_thread(v, B > 256 ? 2 : 1);
  }
  constexpr float norm = hadamard_norm(B);
  return v * norm;
}

template <typename T, uint B>
kernel void hadamard(const device T* x [[buffer(0)]],
                     device T* y [[buffer(1)]],
                     constant HadamardParams& p [[buffer(2)]],
                     uint group [[threadgroup_position_in_grid]],
                     uint tid [[thread_index_in_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float exchange[kHadamardChunk];
  const uint total = p.rows * p.n;
  const uint chunk = group * kHadamardChunk;
  float4 v;
  for (uint r = 0; r < 4; ++r) {
    const uint e = chunk + 4 * tid + r;
    v[r] = e < total ? float(x[e]) : 0.0f;
  }
  v = hadamard_chunk<B>(v, tid, lane, exchange);
  for (uint r = 0; r < 4; ++r) {
    const uint e = chunk + hadamard_index<B>(tid, r);
    if (e < total) {
      y[e] = T(v[r]);
    }
  }
}

template <uint B>
kernel void hadamard_in(const device half* x [[buffer(0)]],
                        const device half* su [[buffer(1)]],
                        device float* xs [[buffer(2)]],
                        constant HadamardParams& p [[buffer(3)]],
                        uint group [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]],
                        uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float exchange[kHadamardChunk];
  const uint total = p.rows * p.n;
  const uint chunk = group * kHadamardChunk;
  float4 v;
  for (uint r = 0; r < 4; ++r) {
    const uint e = chunk + 4 * tid + r;
    v[r] = e < total ? float(x[e]) * float(su[e % p.n]) : 0.0f;
  }
  v = hadamard_chunk<B>(v, tid, lane, exchange);
  for (uint r = 0; r < 4; ++r) {
    const uint e = chunk + hadamard_index<B>(tid, r);
    if (e < total) {
      xs[e] = v[r];
    }
  }
}

template <uint B>
kernel void hadamard_out(const device float* z [[buffer(0)]],
                         const device half* sv [[buffer(1)]],
                         const device half* bias [[buffer(2)]],
                         device half* y [[buffer(3)]],
                         constant HadamardParams& p [[buffer(4)]],
                         uint group [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float exchange[kHadamardChunk];
  const uint total = p.rows * p.n;
  const uint chunk = group * kHadamardChunk;
  float4 v;
  for (uint r = 0; r < 4; ++r) {
    const uint e = chunk + 4 * tid + r;
    v[r] = e < total ? z[e] : 0.0f;
  }
  v = hadamard_chunk<B>(v, tid, lane, exchange);
  for (uint r = 0; r < 4; ++r) {
    const uint e = chunk + hadamard_index<B>(tid, r);
    if (e < total) {
      const uint col = e % p.n;
      const float shifted = p.has_bias != 0 ? float(bias[col]) : 0.0f;
      y[e] = half(v[r] * float(sv[col]) + shifted);
    }
  }
}

#define INSTANTIATE_HADAMARD(B)                                                                              \
  template [[host_name("hadamard_half_" #B)]] [[kernel]] decltype(hadamard<half, B>) hadamard<half, B>;     \
  template [[host_name("hadamard_float_" #B)]] [[kernel]] decltype(hadamard<float, B>) hadamard<float, B>;  \
  template [[host_name("hadamard_in_" #B)]] [[kernel]] decltype(hadamard_in<B>) hadamard_in<B>;             \
  template [[host_name("hadamard_out_" #B)]] [[kernel]] decltype(hadamard_out<B>) hadamard_out<B>;

INSTANTIATE_HADAMARD(1)
INSTANTIATE_HADAMARD(2)
INSTANTIATE_HADAMARD(4)
INSTANTIATE_HADAMARD(8)
INSTANTIATE_HADAMARD(16)
INSTANTIATE_HADAMARD(32)
INSTANTIATE_HADAMARD(64)
INSTANTIATE_HADAMARD(128)
INSTANTIATE_HADAMARD(256)
INSTANTIATE_HADAMARD(512)
