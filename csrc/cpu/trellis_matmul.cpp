// Fused trellis matmul: out[M, N] = x[M, K] @ Q^T with Q decoded from the tile bit streams on the fly
// (Q is never materialised).
//
// Decode (AVX-512): one vector = the 16 steps of one tile row. The tile's 8K words are copied behind
// their last word (ext = [w_{8K-1}, w_0, ..., w_{8K-1}, 0...]) so every window starts at bit
// >= 0; the window of step t starts at ext bit (t+1)K + 16. For a row, one unaligned load brings the
// <= 6 words the row needs, two permutes pick each lane's high and low word, and a funnel shift
// (vpshldvd) + shift right extracts the 16-bit state. The codebook is then computed in-register:
// 3inst/mcg: multiply(-add), and/xor, FP16 add of the two halves (AVX512-FP16: exactly the spec's
// single rounding), convert to float32; 1mad/mul1: byte sum with VNNI (vpdpbusd), then the float
// division / the exact fma + round to half.
//
// GEMV (M <= 8): threads take tile rows (16 outputs); for each tile along K, decode 16 row vectors
// and FMA each into per-(m, row) vector accumulators with x[m, 16j:16j+16]; reduce at the end.
// GEMM (M > 8): per tile row and K chunk of 256, decode 16 tiles into a transposed panel
// [256][16] (16 KiB, L1) and run an 8-row register-blocked FMA micro-kernel over the x rows.
#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "cpu/trellis_kernels.h"

#if METAL_MARLIN_X86
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace metal_marlin::cpu::trellis_cpu {

using metal_marlin::trellis::kTileSteps;
using metal_marlin::trellis::words_per_tile;

// ---------------------------------------------------------------------------------------------
// Dispatch

namespace {

#if METAL_MARLIN_X86
bool os_saves_zmm() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return false;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xE6) == 0xE6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state
}

bool cpu_has_avx512_trellis() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool f = ebx & (1u << 16), dq = ebx & (1u << 17), bw = ebx & (1u << 30), vl = ebx & (1u << 31);
  const bool vbmi2 = ecx & (1u << 6), vnni = ecx & (1u << 11), fp16 = edx & (1u << 23);
  return f && dq && bw && vl && vbmi2 && vnni && fp16 && os_saves_zmm();
}

bool cpu_has_avx2() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
}
#endif

// The best trellis path this CPU supports (the AVX-512 one needs more than the quant_matmul one).
Simd detect() {
#if METAL_MARLIN_X86
  if (cpu_has_avx512_trellis()) return Simd::kAvx512;
  if (cpu_has_avx2()) return Simd::kAvx2;
#endif
  return Simd::kScalar;
}

}  // namespace

// Capped by the process-wide level (cpu::set_simd_level), so tests and benchmarks switch the trellis
// kernels with the others.
Simd simd() {
  static const Simd best = detect();
  Simd cap = Simd::kScalar;
  switch (current_simd_level()) {
    case SimdLevel::kAvx512: cap = Simd::kAvx512; break;
    case SimdLevel::kAvx2: cap = Simd::kAvx2; break;
    case SimdLevel::kScalar: break;
  }
  return std::min(best, cap);
}

const char* simd_name() {
  switch (simd()) {
    case Simd::kAvx512: return "avx512";
    case Simd::kAvx2: return "avx2";
    case Simd::kScalar: break;
  }
  return "scalar";
}

namespace {

constexpr int64_t kGemvMaxRows = 8;

// ---------------------------------------------------------------------------------------------
// Scalar path: decode a whole tile through the value table, then multiply.

void matmul_scalar(const MatmulArgs& a) {
  const float* table = codebook_table(a.cb);
  const int64_t kt = a.k / 16;
  const int words = words_per_tile(a.bits);
  const int threads = plan_threads(a.n_threads, a.n / 16);
  parallel_for(threads, a.n / 16, [&](int64_t i, int) {
    std::vector<float> acc(size_t(a.m) * 16, 0.0f);
    float tile[kTileSteps];
    for (int64_t j = 0; j < kt; ++j) {
      const uint32_t* w = a.packed + (i * kt + j) * words;
      for (int t = 0; t < kTileSteps; ++t) tile[t] = table[trellis::tile_state(w, a.bits, t)];
      for (int64_t m = 0; m < a.m; ++m) {
        const float* xr = a.x + m * a.k + 16 * j;
        for (int r = 0; r < 16; ++r) {
          float s = 0.0f;
          for (int c = 0; c < 16; ++c) s += tile[16 * r + c] * xr[c];
          acc[size_t(m * 16 + r)] += s;
        }
      }
    }
    for (int64_t m = 0; m < a.m; ++m) {
      for (int r = 0; r < 16; ++r) a.out[m * a.n + 16 * i + r] = acc[size_t(m * 16 + r)];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AVX-512 path

#if METAL_MARLIN_X86

// Lane patterns of a tile row: the window of lane c starts at bit o + c*K of the row's first word,
// o = ((16r + 1)K + 16) mod 32 (two patterns: for odd K, odd rows are shifted by 16 bits).
struct RowPattern {
  __m512i hi, lo, shift;
};

struct TileWindows {
  RowPattern pattern[2];
  int first_word[16];  // ext word of row r's load
  int n_words;

  METAL_MARLIN_AVX512_TRELLIS explicit TileWindows(int bits) : n_words(words_per_tile(bits)) {
    for (int p = 0; p < 2; ++p) {
      alignas(64) int32_t hi[16], lo[16], sh[16];
      const int o = ((16 * p + 1) * bits + 16) & 31;
      for (int c = 0; c < 16; ++c) {
        hi[c] = (o + c * bits) >> 5;
        lo[c] = hi[c] + 1;
        sh[c] = (o + c * bits) & 31;
      }
      pattern[p] = {_mm512_load_si512(hi), _mm512_load_si512(lo), _mm512_load_si512(sh)};
    }
    for (int r = 0; r < 16; ++r) first_word[r] = ((16 * r + 1) * bits + 16) >> 5;
  }
  int pattern_of(int r, int bits) const { return (r * bits) & 1; }
};

// ext[0] = last word, ext[1 .. 8K] = the tile; ext beyond stays zero (it is zeroed once per task).
METAL_MARLIN_AVX512_TRELLIS inline void load_ext(const uint32_t* words, int n_words, uint32_t* ext) {
  ext[0] = words[n_words - 1];
  for (int q = 0; q < n_words; q += 16) {
    const int left = n_words - q;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    _mm512_mask_storeu_epi32(ext + 1 + q, mask, _mm512_maskz_loadu_epi32(mask, words + q));
  }
}

METAL_MARLIN_AVX512_TRELLIS inline __m512i row_states(const uint32_t* ext, int first_word, const RowPattern& p) {
  const __m512i v = _mm512_loadu_si512(ext + first_word);
  const __m512i hi = _mm512_permutexvar_epi32(p.hi, v);
  const __m512i lo = _mm512_permutexvar_epi32(p.lo, v);
  return _mm512_srli_epi32(_mm512_shldv_epi32(hi, lo, p.shift), 16);
}

template <Codebook CB>
METAL_MARLIN_AVX512_TRELLIS inline __m512 state_values(__m512i s) {
  if constexpr (CB == Codebook::k3inst || CB == Codebook::kMcg) {
    __m512i x;
    if constexpr (CB == Codebook::k3inst) {
      x = _mm512_add_epi32(_mm512_mullo_epi32(s, _mm512_set1_epi32(int(trellis::k3instMul))),
                           _mm512_set1_epi32(int(trellis::k3instAdd)));
    } else {
      x = _mm512_mullo_epi32(s, _mm512_set1_epi32(int(trellis::kMcgMul)));
    }
    x = _mm512_ternarylogic_epi32(x, _mm512_set1_epi32(int(trellis::kHalfMask)),
                                  _mm512_set1_epi32(int(trellis::kHalfXor)), 0x6a);  // (a & b) ^ c
    const __m512h sum = _mm512_add_ph(_mm512_castsi512_ph(x), _mm512_castsi512_ph(_mm512_srli_epi32(x, 16)));
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_castph_si512(sum)));
  } else if constexpr (CB == Codebook::k1mad) {
    const __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(s, _mm512_set1_epi32(int(trellis::k1madMul))),
                                       _mm512_set1_epi32(int(trellis::k1madAdd)));
    const __m512i y = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, _mm512_set1_epi32(0x01010101));
    return _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(y, _mm512_set1_epi32(510))),
                         _mm512_set1_ps(trellis::k1madDivisor));
  } else {
    const __m512i x = _mm512_mullo_epi32(s, _mm512_set1_epi32(int(trellis::kMul1Mul)));
    const __m512i y = _mm512_dpbusd_epi32(_mm512_set1_epi32(1024), x, _mm512_set1_epi32(0x01010101));
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(y), _mm512_set1_ps(half_to_float(trellis::kMul1InvBits)),
                                     _mm512_set1_ps(half_to_float(trellis::kMul1BiasBits)));
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Tile row i of the GEMV: out[:, 16i : 16i+16].
template <Codebook CB, int M>
METAL_MARLIN_AVX512_TRELLIS void gemv_tile_row(const MatmulArgs& a, const TileWindows& win, int64_t i) {
  const int64_t kt = a.k / 16;
  const int words = win.n_words;
  alignas(64) uint32_t ext[96] = {};
  __m512 acc[M][16];
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < 16; ++r) acc[m][r] = _mm512_setzero_ps();
  }
  const uint32_t* tile = a.packed + i * kt * words;
  for (int64_t j = 0; j < kt; ++j, tile += words) {
    _mm_prefetch(reinterpret_cast<const char*>(tile + 8 * words), _MM_HINT_T0);
    load_ext(tile, words, ext);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(a.x + m * a.k + 16 * j);
    for (int r = 0; r < 16; ++r) {
      const __m512 v = state_values<CB>(row_states(ext, win.first_word[r], win.pattern[win.pattern_of(r, a.bits)]));
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(v, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < 16; ++r) a.out[m * a.n + 16 * i + r] = _mm512_reduce_add_ps(acc[m][r]);
  }
}

template <Codebook CB, int M>
void gemv_avx512(const MatmulArgs& a, const TileWindows& win) {
  const int threads = plan_threads(a.n_threads, a.n / 16);
  parallel_for(threads, a.n / 16, [&](int64_t i, int) { gemv_tile_row<CB, M>(a, win, i); });
}

constexpr int kPanelDepth = 256;  // K columns per panel: [256][16] floats = 16 KiB
constexpr int kMicroRows = 8;

// acc[q] (16 outputs of x row q) += sum_kk x[q, kk] * panel[kk][:]
template <int MR>
METAL_MARLIN_AVX512_TRELLIS inline void micro_kernel(const float* x, int64_t ldx, const float* panel, int depth,
                                                     float* out, int64_t ldo, bool first) {
  __m512 acc[MR];
  for (int q = 0; q < MR; ++q) acc[q] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + q * ldo);
  for (int kk = 0; kk < depth; ++kk) {
    const __m512 w = _mm512_load_ps(panel + 16 * kk);
    for (int q = 0; q < MR; ++q) acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(x[q * ldx + kk]), w, acc[q]);
  }
  for (int q = 0; q < MR; ++q) _mm512_storeu_ps(out + q * ldo, acc[q]);
}

// Tile row i of the GEMM: out[:, 16i : 16i+16].
template <Codebook CB>
METAL_MARLIN_AVX512_TRELLIS void gemm_tile_row(const MatmulArgs& a, const TileWindows& win, int64_t i) {
  const int64_t kt = a.k / 16;
  const int words = win.n_words;
  alignas(64) uint32_t ext[96] = {};
  alignas(64) float rows[16][16];
  alignas(64) float panel[kPanelDepth * 16];
  float* out = a.out + 16 * i;
  for (int64_t k0 = 0; k0 < a.k; k0 += kPanelDepth) {
    const int depth = int(std::min<int64_t>(kPanelDepth, a.k - k0));
    for (int jj = 0; jj < depth / 16; ++jj) {
      load_ext(a.packed + (i * kt + k0 / 16 + jj) * words, words, ext);
      for (int r = 0; r < 16; ++r) {
        _mm512_store_ps(rows[r], state_values<CB>(row_states(ext, win.first_word[r],
                                                              win.pattern[win.pattern_of(r, a.bits)])));
      }
      // panel[16 jj + c][r] = rows[r][c]
      for (int c = 0; c < 16; ++c) {
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(c),
                                             _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160,
                                                               176, 192, 208, 224, 240));
        _mm512_store_ps(panel + 16 * (16 * jj + c), _mm512_mask_i32gather_ps(_mm512_setzero_ps(), __mmask16(0xFFFF), idx, &rows[0][0], 4));
      }
    }
    const bool first = k0 == 0;
    int64_t m0 = 0;
    for (; m0 + kMicroRows <= a.m; m0 += kMicroRows) {
      micro_kernel<kMicroRows>(a.x + m0 * a.k + k0, a.k, panel, depth, out + m0 * a.n, a.n, first);
    }
    const float* xr = a.x + m0 * a.k + k0;
    float* orow = out + m0 * a.n;
    switch (a.m - m0) {
      case 7: micro_kernel<7>(xr, a.k, panel, depth, orow, a.n, first); break;
      case 6: micro_kernel<6>(xr, a.k, panel, depth, orow, a.n, first); break;
      case 5: micro_kernel<5>(xr, a.k, panel, depth, orow, a.n, first); break;
      case 4: micro_kernel<4>(xr, a.k, panel, depth, orow, a.n, first); break;
      case 3: micro_kernel<3>(xr, a.k, panel, depth, orow, a.n, first); break;
      case 2: micro_kernel<2>(xr, a.k, panel, depth, orow, a.n, first); break;
      case 1: micro_kernel<1>(xr, a.k, panel, depth, orow, a.n, first); break;
      default: break;
    }
  }
}

template <Codebook CB>
void gemm_avx512(const MatmulArgs& a, const TileWindows& win) {
  const int threads = plan_threads(a.n_threads, a.n / 16);
  parallel_for(threads, a.n / 16, [&](int64_t i, int) { gemm_tile_row<CB>(a, win, i); });
}

template <Codebook CB>
void matmul_avx512_cb(const MatmulArgs& a) {
  const TileWindows win(a.bits);
  switch (a.m) {
    case 1: return gemv_avx512<CB, 1>(a, win);
    case 2: return gemv_avx512<CB, 2>(a, win);
    case 3: return gemv_avx512<CB, 3>(a, win);
    case 4: return gemv_avx512<CB, 4>(a, win);
    case 5: return gemv_avx512<CB, 5>(a, win);
    case 6: return gemv_avx512<CB, 6>(a, win);
    case 7: return gemv_avx512<CB, 7>(a, win);
    case 8: return gemv_avx512<CB, 8>(a, win);
    default: return gemm_avx512<CB>(a, win);
  }
}

void matmul_avx512(const MatmulArgs& a) {
  switch (a.cb) {
    case Codebook::k3inst: return matmul_avx512_cb<Codebook::k3inst>(a);
    case Codebook::kMcg: return matmul_avx512_cb<Codebook::kMcg>(a);
    case Codebook::k1mad: return matmul_avx512_cb<Codebook::k1mad>(a);
    case Codebook::kMul1: return matmul_avx512_cb<Codebook::kMul1>(a);
  }
}

#endif  // METAL_MARLIN_X86

}  // namespace

void matmul(const MatmulArgs& a) {
  if (a.m == 0 || a.n == 0) return;
  if (a.k == 0) {
    std::fill(a.out, a.out + a.m * a.n, 0.0f);
    return;
  }
  static_assert(kGemvMaxRows == 8, "the GEMV dispatch switch covers M = 1..8");
#if METAL_MARLIN_X86
  if (simd() == Simd::kAvx512) return matmul_avx512(a);
#endif
  matmul_scalar(a);
}

}  // namespace metal_marlin::cpu::trellis_cpu
