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

#if METAL_MARLIN_X86
#include <immintrin.h>
#endif

namespace metal_marlin::cpu::trellis_cpu {
namespace {

using metal_marlin::trellis::kTileSteps;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The AVX-512 path for K >= 3 keeps every best_t (257 x G floats: 4 MiB at K = 4) instead of
// back-pointers and recomputes the argmin of the 2^K candidates of the one group per step it needs
// during the back-trace: the forward inner loop is then sub + fma + min (3 vector ops per 16
// candidates instead of 5). For K <= 2 that history would be 16-32 MiB per thread, so those keep
// back-pointers.
bool use_history(int bits) {
#if METAL_MARLIN_X86
  return bits >= 3 && simd() == Simd::kAvx512;
#else
  (void)bits;
  return false;
#endif
}

struct Scratch {
  std::vector<uint8_t> bp;    // [256, G]
  std::vector<float> a, b;    // best_t ping-pong, G + 16 (padding for the K < 4 vector loads)
  std::vector<float> history;  // [257, G + 16] best_t for t = 0..256 (history mode)
  int64_t stride = 0;
  void resize(int bits) {
    const size_t g = size_t(1) << (16 - bits);
    stride = int64_t(g) + 16;
    a.assign(g + 16, 0.0f);
    b.assign(g + 16, 0.0f);
    if (use_history(bits)) {
      history.assign(size_t(kTileSteps + 1) * size_t(stride), 0.0f);
    } else {
      bp.resize(size_t(kTileSteps) * g);
    }
  }
};

// Forward pass (portable). best_0 in `prev`; returns the buffer holding best_256.
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
        const float c = d * d + b[g >> bits];
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
// Four independent 16-group vectors per iteration hide the compare -> masked-move latency chain.
template <int K>
METAL_MARLIN_AVX512_TRELLIS float* forward_avx512(const float* x, const float* table, float* prev, float* next,
                                                  uint8_t* bp) {
  constexpr int G = 1 << (16 - K);
  constexpr int J = 1 << K;
  constexpr int S = 1 << (16 - 2 * K);
  constexpr int U = 4;
  static_assert(G % (16 * U) == 0, "group count must be a multiple of the unroll");
  const __m512i lane_group = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), K < 4 ? K : 0);
  for (int t = 0; t < kTileSteps; ++t) {
    const __m512 xt = _mm512_set1_ps(x[t]);
    uint8_t* bpt = bp + t * G;
    for (int g0 = 0; g0 < G; g0 += 16 * U) {
      __m512 m[U];
      __m512i arg[U];
      for (int u = 0; u < U; ++u) {
        m[u] = _mm512_set1_ps(kInf);
        arg[u] = _mm512_setzero_si512();
      }
      for (int j = 0; j < J; ++j) {
        const __m512i jv = _mm512_set1_epi32(j);
        for (int u = 0; u < U; ++u) {
          const int g = g0 + 16 * u;
          const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(table + j * G + g), xt);
          const float* bsrc = prev + j * S + (g >> K);
          __m512 b;
          if constexpr (K >= 4) {
            b = _mm512_set1_ps(*bsrc);
          } else {
            b = _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(bsrc));
          }
          const __m512 c = _mm512_fmadd_ps(d, d, b);
          const __mmask16 lt = _mm512_cmp_ps_mask(c, m[u], _CMP_LT_OQ);
          m[u] = _mm512_mask_mov_ps(m[u], lt, c);
          arg[u] = _mm512_mask_mov_epi32(arg[u], lt, jv);
        }
      }
      for (int u = 0; u < U; ++u) {
        _mm512_storeu_ps(next + g0 + 16 * u, m[u]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bpt + g0 + 16 * u), _mm512_cvtepi32_epi8(arg[u]));
      }
    }
    std::swap(prev, next);
  }
  return prev;
}

// History mode: best_t lives at hist + t * stride; returns best_256.
template <int K>
METAL_MARLIN_AVX512_TRELLIS float* forward_history_avx512(const float* x, const float* table, float* hist,
                                                          int64_t stride) {
  constexpr int G = 1 << (16 - K);
  constexpr int J = 1 << K;
  constexpr int S = 1 << (16 - 2 * K);
  constexpr int U = 4;
  static_assert(G % (16 * U) == 0, "group count must be a multiple of the unroll");
  const __m512i lane_group = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), K < 4 ? K : 0);
  for (int t = 0; t < kTileSteps; ++t) {
    const __m512 xt = _mm512_set1_ps(x[t]);
    const float* prev = hist + t * stride;
    float* next = hist + (t + 1) * stride;
    for (int g0 = 0; g0 < G; g0 += 16 * U) {
      __m512 m[U];
      for (int u = 0; u < U; ++u) m[u] = _mm512_set1_ps(kInf);
      for (int j = 0; j < J; ++j) {
        for (int u = 0; u < U; ++u) {
          const int g = g0 + 16 * u;
          const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(table + j * G + g), xt);
          const float* bsrc = prev + j * S + (g >> K);
          __m512 b;
          if constexpr (K >= 4) {
            b = _mm512_set1_ps(*bsrc);
          } else {
            b = _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(bsrc));
          }
          m[u] = _mm512_min_ps(m[u], _mm512_fmadd_ps(d, d, b));
        }
      }
      for (int u = 0; u < U; ++u) _mm512_storeu_ps(next + g0 + 16 * u, m[u]);
    }
  }
  return hist + kTileSteps * stride;
}

// Back-trace from group g at the end: recompute the candidates of the path's group at each step
// with the forward pass's exact arithmetic (sub, fma) and take the first minimum.
METAL_MARLIN_AVX512_TRELLIS void trace_history(const float* x, int bits, const float* table, const float* hist,
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

METAL_MARLIN_AVX512_TRELLIS float* forward_history_dispatch(const float* x, int bits, const float* table, float* hist,
                                                            int64_t stride) {
  switch (bits) {
    case 3: return forward_history_avx512<3>(x, table, hist, stride);
    case 4: return forward_history_avx512<4>(x, table, hist, stride);
    case 5: return forward_history_avx512<5>(x, table, hist, stride);
    case 6: return forward_history_avx512<6>(x, table, hist, stride);
    case 7: return forward_history_avx512<7>(x, table, hist, stride);
    default: return forward_history_avx512<8>(x, table, hist, stride);
  }
}

METAL_MARLIN_AVX512_TRELLIS float* forward_avx512_dispatch(const float* x, int bits, const float* table, float* prev,
                                                           float* next, uint8_t* bp) {
  switch (bits) {
    case 1: return forward_avx512<1>(x, table, prev, next, bp);
    case 2: return forward_avx512<2>(x, table, prev, next, bp);
    case 3: return forward_avx512<3>(x, table, prev, next, bp);
    case 4: return forward_avx512<4>(x, table, prev, next, bp);
    case 5: return forward_avx512<5>(x, table, prev, next, bp);
    case 6: return forward_avx512<6>(x, table, prev, next, bp);
    case 7: return forward_avx512<7>(x, table, prev, next, bp);
    default: return forward_avx512<8>(x, table, prev, next, bp);
  }
}
#endif

using ForwardFn = float* (*)(const float*, int, const float*, float*, float*, uint8_t*);

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
void run_pass(const float* x, int bits, const float* table, Scratch& scratch, ForwardFn forward, Init init,
              PickEnd pick_end, uint32_t* states) {
#if METAL_MARLIN_X86
  if (use_history(bits)) {
    float* hist = scratch.history.data();
    init(hist);
    const float* best = forward_history_dispatch(x, bits, table, hist, scratch.stride);
    trace_history(x, bits, table, hist, scratch.stride, pick_end(best), states);
    return;
  }
#endif
  init(scratch.a.data());
  const float* best = forward(x, bits, table, scratch.a.data(), scratch.b.data(), scratch.bp.data());
  trace_back(scratch.bp.data(), bits, pick_end(best), states);
}

void quantize_tile(const float* target, int bits, const float* table, uint32_t* words, float* values,
                   Scratch& scratch, ForwardFn forward) {
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

float* forward_scalar_fn(const float* x, int bits, const float* table, float* prev, float* next, uint8_t* bp) {
  return forward_scalar(x, bits, table, prev, next, bp);
}

#if METAL_MARLIN_X86
float* forward_avx512_fn(const float* x, int bits, const float* table, float* prev, float* next, uint8_t* bp) {
  return forward_avx512_dispatch(x, bits, table, prev, next, bp);
}
#endif

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
  ForwardFn forward = forward_scalar_fn;
#if METAL_MARLIN_X86
  if (simd() == Simd::kAvx512) forward = forward_avx512_fn;
#endif
  const int threads = plan_threads(n_threads, n_tiles);
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  for (auto& s : scratch) s.resize(bits);
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
