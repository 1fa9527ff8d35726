// What the SIMD trellis matmuls (trellis_matmul_avx2.cpp, trellis_matmul_avx512.cpp) share: the decode
// plan cache, the choice of kernel by codebook and number of rows, the threading over tile rows and the
// GEMM's K slicing and row blocking. Each file brings its decode and multiply kernels as a table:
//
//   template <Codebook CB> struct Kernels {
//     using Plan = ...;                         // per bit width, built by build_plan(bits, plan)
//     static constexpr int kMicroRows;          // rows of x per GEMM micro-kernel call
//     template <int M> static constexpr TileRowFn<Plan> gemv;   // GEMV of tile row i for M rows of x
//     static constexpr DecodeFn<Plan> decode_tile;              // tile -> panel block [16 cols][16 rows]
//     template <int MR> static constexpr MicroKernelFn multiply;  // MR rows of x times a panel
//   };
//
// The kernels are target-attributed functions of their file; this driver only calls them (it has no
// vector code of its own).
#pragma once

#include <algorithm>
#include <array>

#include "cpu/thread_pool.h"
#include "cpu/trellis_kernels.h"

namespace metal_marlin::cpu::trellis_cpu::matmul_driver {

// Computes out[:, 16i : 16i+16] (tile row i of the packed weight).
template <class Plan>
using TileRowFn = void (*)(const MatmulArgs& a, const Plan& plan, int64_t i);
// Decodes one tile into dst[16 * c + r] = Q[r, c] (row c of a [K, 16] panel is column c of the tile).
template <class Plan>
using DecodeFn = void (*)(const uint32_t* tile, int words, const Plan& plan, float* dst);
// out[q, 0:16] = (first ? 0 : out[q, 0:16]) + sum_kk x[q * ldx + kk] * panel[16 kk : 16 kk + 16].
using MicroKernelFn = void (*)(const float* x, int64_t ldx, const float* panel, int depth, float* out, int64_t ldo,
                               bool first);

// The plan of each bit width, built once per process.
template <class Plan, void (*Build)(int bits, Plan& plan)>
const Plan& plan_for_bits(int bits) {
  static const auto plans = [] {
    std::array<Plan, trellis::kMaxBits> all{};
    for (int b = trellis::kMinBits; b <= trellis::kMaxBits; ++b) Build(b, all[size_t(b - 1)]);
    return all;
  }();
  return plans[size_t(bits - 1)];
}

constexpr int kPanelDepth = 256;  // K columns per GEMM panel: [256][16] floats = 16 KiB

// Kernels::multiply<R> for the last `rows` (< R) rows of x, by recursion over R.
template <class Kernels, int R>
void multiply_remainder(int rows, const float* x, int64_t ldx, const float* panel, int depth, float* out,
                        int64_t ldo, bool first) {
  if constexpr (R > 0) {
    if (rows == R) return Kernels::template multiply<R>(x, ldx, panel, depth, out, ldo, first);
    multiply_remainder<Kernels, R - 1>(rows, x, ldx, panel, depth, out, ldo, first);
  }
}

// Tile row i of the GEMM: per K slice of kPanelDepth, the slice's tiles are decoded into one panel
// [depth][16] once for all rows of x, which are multiplied by it kMicroRows at a time.
template <class Kernels>
void gemm_tile_row(const MatmulArgs& a, const typename Kernels::Plan& plan, int64_t i) {
  constexpr int kMicroRows = Kernels::kMicroRows;
  const int64_t kt = a.k / 16;
  const int words = trellis::words_per_tile(a.bits);
  alignas(64) float panel[kPanelDepth * 16];
  float* out = a.out + 16 * i;
  for (int64_t k0 = 0; k0 < a.k; k0 += kPanelDepth) {
    const int depth = int(std::min<int64_t>(kPanelDepth, a.k - k0));
    for (int jj = 0; jj < depth / 16; ++jj) {
      Kernels::decode_tile(a.packed + (i * kt + k0 / 16 + jj) * words, words, plan, panel + 16 * 16 * jj);
    }
    const bool first = k0 == 0;
    int64_t m0 = 0;
    for (; m0 + kMicroRows <= a.m; m0 += kMicroRows) {
      Kernels::template multiply<kMicroRows>(a.x + m0 * a.k + k0, a.k, panel, depth, out + m0 * a.n, a.n, first);
    }
    multiply_remainder<Kernels, kMicroRows - 1>(int(a.m - m0), a.x + m0 * a.k + k0, a.k, panel, depth,
                                                out + m0 * a.n, a.n, first);
  }
}

template <class Kernels>
TileRowFn<typename Kernels::Plan> tile_row_for_rows(int64_t m) {
  static_assert(kGemvMaxRows == 8, "the GEMV cases cover M = 1..8");
  switch (m) {
    case 1: return Kernels::template gemv<1>;
    case 2: return Kernels::template gemv<2>;
    case 3: return Kernels::template gemv<3>;
    case 4: return Kernels::template gemv<4>;
    case 5: return Kernels::template gemv<5>;
    case 6: return Kernels::template gemv<6>;
    case 7: return Kernels::template gemv<7>;
    case 8: return Kernels::template gemv<8>;
    default: return gemm_tile_row<Kernels>;
  }
}

// out = x @ Q^T with Kernels<a.cb>, the tile rows spread over the thread pool.
template <template <Codebook> class Kernels, class Plan>
void run(const MatmulArgs& a, const Plan& plan) {
  TileRowFn<Plan> tile_row = nullptr;
  switch (a.cb) {
    case Codebook::k3inst: tile_row = tile_row_for_rows<Kernels<Codebook::k3inst>>(a.m); break;
    case Codebook::kMcg: tile_row = tile_row_for_rows<Kernels<Codebook::kMcg>>(a.m); break;
    case Codebook::k1mad: tile_row = tile_row_for_rows<Kernels<Codebook::k1mad>>(a.m); break;
    case Codebook::kMul1: tile_row = tile_row_for_rows<Kernels<Codebook::kMul1>>(a.m); break;
  }
  const int threads = plan_threads(a.n_threads, a.n / 16);
  parallel_for(threads, a.n / 16, [&](int64_t i, int) { tile_row(a, plan, i); });
}

}  // namespace metal_marlin::cpu::trellis_cpu::matmul_driver
