// Tail-biting Viterbi quantizer for the bitshift trellis (L = 16, one value per step, 256 steps).
//
// Recurrence. With G = 2^(16-K) "groups", state s = j*G + g has low 16-K bits g and top K bits j;
// its successors are the states whose high 16-K bits equal g, so every state of group g shares the
// same 2^K predecessors. Instead of a cost per state we keep best_t[g] = the cheapest path over steps
// < t whose last state has low bits g (the min over predecessors computed once per class):
//   best_{t+1}[g] = min_j best_t[(j*G + g) >> K] + (f(j*G + g) - x_t)^2,   bp_t[g] = argmin j.
// For 16 consecutive groups g the 16 table entries f(j*G + g) are contiguous and (j*G + g) >> K
// takes 16 >> K distinct values, so one vector step is: load f, subtract, broadcast/permute best,
// fma, compare, two masked moves. Work per trellis step: 2^16 candidates; state: 2^(16-K) floats
// (16 KiB at K = 4, in L1) plus the codebook table (256 KiB, in L2); back-pointers 2^(16-K) bytes per
// step (the K-bit j).
//
// Tail-biting (two passes): pass 1 runs unconstrained on the tile rotated by 128 steps, traces back
// and reads the state at original step 0; its high 16-K bits are the ring's overlap. Pass 2 starts
// only from states whose high bits equal the overlap (best_0 = 0 there, +inf elsewhere) and ends in
// the group g = overlap, i.e. a state whose low 16-K bits equal it: an exactly consistent ring.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "cpu/thread_pool.h"
#include "cpu/trellis_kernels.h"

namespace metal_marlin::cpu::trellis_cpu {
namespace {

using metal_marlin::trellis::kTileSteps;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The SIMD paths for K >= 3 keep every best_t (257 x G floats: 4 MiB at K = 4) instead of
// back-pointers and recompute the argmin of the 2^K candidates of the one group per step they need
// during the back-trace: the forward inner loop is then sub + fma + min (3 vector ops per vector of
// candidates instead of 5). For K <= 2 that history would be 16-32 MiB per thread, so those keep
// back-pointers.
//
// Every path computes each candidate as fma(d, d, best) with d = f - x (one rounding, as the vector
// FMA) and keeps the first minimum in j order, so all paths return the same bit streams.

// Back-pointer mode: best_0 in `prev`; returns the buffer holding best_256; bp [256, G] gets the argmin j.
using ForwardFn = float* (*)(const float* x, int bits, const float* table, float* prev, float* next, uint8_t* bp);
// History mode: best_t is written to hist + t * stride for t = 1..256 (best_0 set by the caller);
// returns best_256.
using HistoryFn = float* (*)(const float* x, int bits, const float* table, float* hist, int64_t stride);

// The forward pass of one path for one K: history mode if `history` is set.
struct Forward {
  ForwardFn back_pointers = nullptr;
  HistoryFn history = nullptr;
};

struct Scratch {
  std::vector<uint8_t> bp;    // [256, G]
  std::vector<float> a, b;    // best_t ping-pong, G + 16 (padding for the K < 4 vector loads)
  std::vector<float> history;  // [257, G + 16] best_t for t = 0..256 (history mode)
  int64_t stride = 0;
  void resize(int bits, bool history_mode) {
    const size_t g = size_t(1) << (16 - bits);
    stride = int64_t(g) + 16;
    a.assign(g + 16, 0.0f);
    b.assign(g + 16, 0.0f);
    if (history_mode) {
      history.assign(size_t(kTileSteps + 1) * size_t(stride), 0.0f);
    } else {
      bp.resize(size_t(kTileSteps) * g);
    }
  }
};

float* forward_scalar(const float* x, int bits, const float* table, float* prev, float* next, uint8_t* bp) {
  const int64_t g_count = int64_t(1) << (16 - bits);
  const int j_count = 1 << bits;
  const int64_t stride = int64_t(1) << (16 - 2 * bits);  // best index step per j: (j*G) >> K
  for (int t = 0; t < kTileSteps; ++t) {
    const float xt = x[t];
    uint8_t* bpt = bp + t * g_count;
    for (int j = 0; j < j_count; ++j) {
      const float* f = table + j * g_count;
      const float* b = prev + j * stride;
      for (int64_t g = 0; g < g_count; ++g) {
        const float d = f[g] - xt;
        const float c = std::fma(d, d, b[g >> bits]);
        if (j == 0 || c < next[g]) {
          next[g] = c;
          bpt[g] = uint8_t(j);
        }
      }
    }
    std::swap(prev, next);
  }
  return prev;
}

#if METAL_MARLIN_X86
// ---------------------------------------------------------------------------------------------
// SIMD forward passes. One block is kUnroll vectors of consecutive groups: the independent vectors
// hide the compare -> masked-move (back-pointer mode) or the min (history mode) latency chain.
// The loops are written once over a Lanes struct (one per ISA and K) that holds the block's vectors
// and does the vector work in target-attributed member functions. Vectors never cross a call: the
// loops are only called from the flattened entry points below (Avx512Pass, Avx2Pass), which inline
// everything into code compiled for their ISA.
constexpr int kUnroll = 4;

// Lanes<K> interface: kGroups (groups per block); set_target(x_t); clear() (every running minimum
// +inf, its j 0); first_min(f, best, g0, j) and min(f, best, g0) fold in the candidates of one j for
// groups g0 .. g0 + kGroups - 1 (f = f(j*G + .) from group 0, best = best_t from j's first
// predecessor); store(next + g0[, bp_t + g0]) writes the minima [and their j].
template <class Lanes, int K>
float* forward_back_pointers(const float* x, const float* table, float* prev, float* next, uint8_t* bp) {
  constexpr int G = 1 << (16 - K);
  constexpr int J = 1 << K;
  constexpr int S = 1 << (16 - 2 * K);
  static_assert(G % Lanes::kGroups == 0, "group count must be a multiple of the block");
  Lanes lanes;
  for (int t = 0; t < kTileSteps; ++t) {
    lanes.set_target(x[t]);
    uint8_t* bpt = bp + t * G;
    for (int g0 = 0; g0 < G; g0 += Lanes::kGroups) {
      lanes.clear();
      for (int j = 0; j < J; ++j) lanes.first_min(table + j * G, prev + j * S, g0, j);
      lanes.store(next + g0, bpt + g0);
    }
    std::swap(prev, next);
  }
  return prev;
}

template <class Lanes, int K>
float* forward_history(const float* x, const float* table, float* hist, int64_t stride) {
  constexpr int G = 1 << (16 - K);
  constexpr int J = 1 << K;
  constexpr int S = 1 << (16 - 2 * K);
  static_assert(G % Lanes::kGroups == 0, "group count must be a multiple of the block");
  Lanes lanes;
  for (int t = 0; t < kTileSteps; ++t) {
    lanes.set_target(x[t]);
    const float* prev = hist + t * stride;
    float* next = hist + (t + 1) * stride;
    for (int g0 = 0; g0 < G; g0 += Lanes::kGroups) {
      lanes.clear();
      for (int j = 0; j < J; ++j) lanes.min(table + j * G, prev + j * S, g0);
      lanes.store(next + g0);
    }
  }
  return hist + kTileSteps * stride;
}

// AVX-512: 16 groups per vector.
template <int K>
struct Avx512Lanes {
  static constexpr int kGroups = 16 * kUnroll;
  __m512 xt;
  __m512 m[kUnroll];
  __m512i arg[kUnroll];

  METAL_MARLIN_AVX512_TRELLIS void set_target(float x) { xt = _mm512_set1_ps(x); }
  METAL_MARLIN_AVX512_TRELLIS void clear() {
    for (int u = 0; u < kUnroll; ++u) {
      m[u] = _mm512_set1_ps(kInf);
      arg[u] = _mm512_setzero_si512();
    }
  }
  // best_t of the predecessors of groups g..g+15: entry (g >> K) + lane >> K.
  METAL_MARLIN_AVX512_TRELLIS static __m512 predecessors(const float* best) {
    if constexpr (K >= 4) {
      return _mm512_set1_ps(*best);
    } else {
      const __m512i lane_group =
          _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), K);
      return _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(best));
    }
  }
  METAL_MARLIN_AVX512_TRELLIS __m512 candidates(const float* f, const float* best, int g) const {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(f + g), xt);
    return _mm512_fmadd_ps(d, d, predecessors(best + (g >> K)));
  }
  METAL_MARLIN_AVX512_TRELLIS void first_min(const float* f, const float* best, int g0, int j) {
    const __m512i jv = _mm512_set1_epi32(j);
    for (int u = 0; u < kUnroll; ++u) {
      const __m512 c = candidates(f, best, g0 + 16 * u);
      const __mmask16 lt = _mm512_cmp_ps_mask(c, m[u], _CMP_LT_OQ);
      m[u] = _mm512_mask_mov_ps(m[u], lt, c);
      arg[u] = _mm512_mask_mov_epi32(arg[u], lt, jv);
    }
  }
  METAL_MARLIN_AVX512_TRELLIS void min(const float* f, const float* best, int g0) {
    for (int u = 0; u < kUnroll; ++u) m[u] = _mm512_min_ps(m[u], candidates(f, best, g0 + 16 * u));
  }
  METAL_MARLIN_AVX512_TRELLIS void store(float* next) const {
    for (int u = 0; u < kUnroll; ++u) _mm512_storeu_ps(next + 16 * u, m[u]);
  }
  METAL_MARLIN_AVX512_TRELLIS void store(float* next, uint8_t* bp) const {
    store(next);
    for (int u = 0; u < kUnroll; ++u) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bp + 16 * u), _mm512_cvtepi32_epi8(arg[u]));
    }
  }
};

// AVX2: 8 groups per vector.
template <int K>
struct Avx2Lanes {
  static constexpr int kGroups = 8 * kUnroll;
  __m256 xt;
  __m256 m[kUnroll];
  __m256i arg[kUnroll];

  METAL_MARLIN_AVX2 void set_target(float x) { xt = _mm256_set1_ps(x); }
  METAL_MARLIN_AVX2 void clear() {
    for (int u = 0; u < kUnroll; ++u) {
      m[u] = _mm256_set1_ps(kInf);
      arg[u] = _mm256_setzero_si256();
    }
  }
  METAL_MARLIN_AVX2 static __m256 predecessors(const float* best) {
    if constexpr (K >= 3) {
      return _mm256_broadcast_ss(best);
    } else {
      const __m256i lane_group = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), K);
      return _mm256_permutevar8x32_ps(_mm256_loadu_ps(best), lane_group);
    }
  }
  METAL_MARLIN_AVX2 __m256 candidates(const float* f, const float* best, int g) const {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(f + g), xt);
    return _mm256_fmadd_ps(d, d, predecessors(best + (g >> K)));
  }
  METAL_MARLIN_AVX2 void first_min(const float* f, const float* best, int g0, int j) {
    const __m256 jv = _mm256_castsi256_ps(_mm256_set1_epi32(j));
    for (int u = 0; u < kUnroll; ++u) {
      const __m256 c = candidates(f, best, g0 + 8 * u);
      const __m256 lt = _mm256_cmp_ps(c, m[u], _CMP_LT_OQ);
      m[u] = _mm256_blendv_ps(m[u], c, lt);
      arg[u] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg[u]), jv, lt));
    }
  }
  METAL_MARLIN_AVX2 void min(const float* f, const float* best, int g0) {
    for (int u = 0; u < kUnroll; ++u) m[u] = _mm256_min_ps(m[u], candidates(f, best, g0 + 8 * u));
  }
  METAL_MARLIN_AVX2 void store(float* next) const {
    for (int u = 0; u < kUnroll; ++u) _mm256_storeu_ps(next + 8 * u, m[u]);
  }
  // bp[0..31] = the low bytes of the 32 lanes of arg (values < 256).
  METAL_MARLIN_AVX2 void store(float* next, uint8_t* bp) const {
    static_assert(kUnroll == 4, "one 32-byte store of four vectors' bytes");
    store(next);
    const __m256i words =
        _mm256_packus_epi16(_mm256_packs_epi32(arg[0], arg[1]), _mm256_packs_epi32(arg[2], arg[3]));
    // The packs work per 128-bit half: dword i of `words` holds lanes 4 (i / 4) .. 4 (i / 4) + 3 of arg[i % 4].
    const __m256i ordered = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bp), ordered);
  }
};

// Back-trace from group g at the end: recompute the candidates of the path's group at each step
// with the forward pass's exact arithmetic (sub, fma) and take the first minimum.
METAL_MARLIN_AVX2 void trace_history(const float* x, int bits, const float* table, const float* hist,
                                     int64_t stride, uint32_t g, uint32_t* states) {
  const uint32_t g_count = 1u << (16 - bits);
  for (int t = kTileSteps - 1; t >= 0; --t) {
    const float* prev = hist + t * stride;
    const __m128 xt = _mm_set_ss(x[t]);
    float best = kInf;
    uint32_t best_s = g;
    for (uint32_t j = 0; j < (1u << bits); ++j) {
      const uint32_t s = j * g_count + g;
      const __m128 d = _mm_sub_ss(_mm_set_ss(table[s]), xt);
      const float c = _mm_cvtss_f32(_mm_fmadd_ss(d, d, _mm_set_ss(prev[s >> bits])));
      if (c < best) {
        best = c;
        best_s = s;
      }
    }
    states[t] = best_s;
    g = best_s >> bits;
  }
}

// Instantiations per K: back-pointer mode for K <= 2, history mode above.
template <template <int> class Pass>
Forward forward_for(int bits) {
  switch (bits) {
    case 1: return {Pass<1>::back_pointers, nullptr};
    case 2: return {Pass<2>::back_pointers, nullptr};
    case 3: return {nullptr, Pass<3>::history};
    case 4: return {nullptr, Pass<4>::history};
    case 5: return {nullptr, Pass<5>::history};
    case 6: return {nullptr, Pass<6>::history};
    case 7: return {nullptr, Pass<7>::history};
    default: return {nullptr, Pass<8>::history};
  }
}

// The entry points: flatten inlines the shared loops and the Lanes members into code for one ISA.
template <int K>
struct Avx512Pass {
  METAL_MARLIN_AVX512_TRELLIS __attribute__((flatten)) static float* back_pointers(
      const float* x, int, const float* table, float* prev, float* next, uint8_t* bp) {
    return forward_back_pointers<Avx512Lanes<K>, K>(x, table, prev, next, bp);
  }
  METAL_MARLIN_AVX512_TRELLIS __attribute__((flatten)) static float* history(const float* x, int, const float* table,
                                                                             float* hist, int64_t stride) {
    return forward_history<Avx512Lanes<K>, K>(x, table, hist, stride);
  }
};

template <int K>
struct Avx2Pass {
  METAL_MARLIN_AVX2 __attribute__((flatten)) static float* back_pointers(const float* x, int, const float* table,
                                                                         float* prev, float* next, uint8_t* bp) {
    return forward_back_pointers<Avx2Lanes<K>, K>(x, table, prev, next, bp);
  }
  METAL_MARLIN_AVX2 __attribute__((flatten)) static float* history(const float* x, int, const float* table,
                                                                   float* hist, int64_t stride) {
    return forward_history<Avx2Lanes<K>, K>(x, table, hist, stride);
  }
};
#endif

Forward pick_forward(int bits) {
  switch (simd()) {
#if METAL_MARLIN_X86
    case Simd::kAvx512: return forward_for<Avx512Pass>(bits);
    case Simd::kAvx2: return forward_for<Avx2Pass>(bits);
#endif
    default: return {forward_scalar, nullptr};
  }
}

// Back-trace from group g at the end: the state of step t is bp_t[g] * G + g, and the group of its
// predecessor is that state >> K.
void trace_back(const uint8_t* bp, int bits, uint32_t g, uint32_t* states) {
  const int64_t g_count = int64_t(1) << (16 - bits);
  for (int t = kTileSteps - 1; t >= 0; --t) {
    const uint32_t s = (uint32_t(bp[t * g_count + g]) << (16 - bits)) | g;
    states[t] = s;
    g = s >> bits;
  }
}

// One pass: forward from best_0 (set by `init`), back-trace from the end group chosen by `pick_end`.
template <class Init, class PickEnd>
void run_pass(const float* x, int bits, const float* table, Scratch& scratch, const Forward& forward, Init init,
              PickEnd pick_end, uint32_t* states) {
#if METAL_MARLIN_X86
  if (forward.history) {
    float* hist = scratch.history.data();
    init(hist);
    const float* best = forward.history(x, bits, table, hist, scratch.stride);
    trace_history(x, bits, table, hist, scratch.stride, pick_end(best), states);
    return;
  }
#endif
  init(scratch.a.data());
  const float* best = forward.back_pointers(x, bits, table, scratch.a.data(), scratch.b.data(), scratch.bp.data());
  trace_back(scratch.bp.data(), bits, pick_end(best), states);
}

void quantize_tile(const float* target, int bits, const float* table, uint32_t* words, float* values,
                   Scratch& scratch, const Forward& forward) {
  const int64_t g_count = int64_t(1) << (16 - bits);
  uint32_t states[kTileSteps];

  // Pass 1: unconstrained, on the tile rotated by half its length.
  float rotated[kTileSteps];
  for (int u = 0; u < kTileSteps; ++u) rotated[u] = target[(u + kTileSteps / 2) % kTileSteps];
  const auto argmin_end = [&](const float* best) {
    uint32_t g_end = 0;
    for (int64_t g = 1; g < g_count; ++g) {
      if (best[g] < best[g_end]) g_end = uint32_t(g);
    }
    return g_end;
  };
  run_pass(rotated, bits, table, scratch, forward, [&](float* best0) { std::fill(best0, best0 + g_count, 0.0f); },
           argmin_end, states);
  const uint32_t overlap = states[kTileSteps / 2] >> bits;

  // Pass 2: start in the overlap's successors, end in its predecessors.
  run_pass(
      target, bits, table, scratch, forward,
      [&](float* best0) {
        std::fill(best0, best0 + g_count, kInf);
        best0[overlap] = 0.0f;
      },
      [&](const float*) { return overlap; }, states);

  std::memset(words, 0, sizeof(uint32_t) * size_t(trellis::words_per_tile(bits)));
  for (int t = 0; t < kTileSteps; ++t) {
    trellis::put_step_bits(words, bits, t, states[t]);
    values[t] = table[states[t]];
  }
}

}  // namespace

const float* codebook_table(Codebook cb) {
  static std::once_flag once[4];
  static std::vector<float> tables[4];
  const int index = int(cb);
  std::call_once(once[index], [&] {
    tables[index].resize(trellis::kNumStates);
    for (uint32_t s = 0; s < trellis::kNumStates; ++s) tables[index][s] = trellis::codebook_value(cb, s);
  });
  return tables[index].data();
}

void quantize(const float* targets, int64_t n_tiles, int bits, Codebook cb, uint32_t* packed, float* values,
              int n_threads) {
  if (n_tiles == 0) return;
  const float* table = codebook_table(cb);
  const Forward forward = pick_forward(bits);
  const int threads = plan_threads(n_threads, n_tiles);
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  for (auto& s : scratch) s.resize(bits, forward.history != nullptr);
  const int words = trellis::words_per_tile(bits);
  parallel_for(threads, n_tiles, [&](int64_t tile, int thread) {
    quantize_tile(targets + tile * kTileSteps, bits, table, packed + tile * words, values + tile * kTileSteps,
                  scratch[size_t(thread)], forward);
  });
}

void decode(const uint32_t* packed, int64_t n_tiles, int bits, Codebook cb, float* out) {
  const float* table = codebook_table(cb);
  const int words = trellis::words_per_tile(bits);
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const uint32_t* w = packed + tile * words;
    float* dst = out + tile * kTileSteps;
    for (int t = 0; t < kTileSteps; ++t) dst[t] = table[trellis::tile_state(w, bits, t)];
  }
}

}  // namespace metal_marlin::cpu::trellis_cpu
