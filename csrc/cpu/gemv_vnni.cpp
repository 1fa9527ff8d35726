// The integer GEMV for int4 and int8 weights on AVX-512 VNNI (Ice Lake, Sapphire Rapids, Zen 4).
//
// The float GEMV spends most of its time turning codes into floats (a shuffle and a conversion per 16
// weights), which leaves it well short of memory bandwidth at decode. Here the codes stay integers:
// vpdpbusd multiplies 64 unsigned code bytes by 64 signed activation bytes and adds each 4 products
// into an int32 lane, so a 64-byte chunk of int4 weights (128 codes) costs two masks, a shift and four
// vpdpbusd, whatever the group size.
//
// Activations become 16-bit fixed point per 32-block: t = round(x / d_b), d_b = max|x_b| / 32639,
// split as t = 256 * high + low with both halves int8, and each chunk is multiplied twice (high and low)
// then recombined as (high_sum << 8) + low_sum. Per element that is an error of at most d_b / 2 =
// max|x_b| / 65278 (about 2^-16 of the block's largest activation), against 2^-8 for the usual int8
// activations; docs/kernels.md states the resulting bound and the tests check it. The offset terms
// o_g * sum(x over g) use the exact float sums.
//
// Byte order: an int4 block is 16 bytes, byte j holding codes 2j (low nibble) and 2j + 1, so the
// activations are laid out as [high even codes | high odd codes | low even | low odd], 64 bytes each
// per chunk; int8 code c is byte c, laid out [high | low]. Each int32 lane of a chunk sums codes of one
// 32-block (4 lanes per block for int4, 8 for int8), which is then scaled by s_g * d_b in float.
#include "common/simd.h"

#if METAL_MARLIN_X86

#include <algorithm>
#include <cstring>

#include "cpu/gemv.h"
#include "cpu/vnni_activations.h"


namespace metal_marlin::cpu {
namespace {

constexpr int kChunkBytes = 64;
constexpr int kPrefetchBytes = 2048;  // as in group_gemv.h

template <Format F>
struct VnniLayout;
template <>
struct VnniLayout<Format::kInt4> {
  static constexpr int kBlocksPerChunk = 4;  // 16 bytes per block
  static constexpr int kPlanes = 4;          // high even, high odd, low even, low odd
};
template <>
struct VnniLayout<Format::kInt8> {
  static constexpr int kBlocksPerChunk = 2;  // 32 bytes per block
  static constexpr int kPlanes = 2;          // high, low
};

template <Format F>
METAL_MARLIN_AVX512_VNNI void prepare(const QuantizedMatrix& w, const float* x, int64_t m, VnniActivations& a) {
  using Layout = VnniLayout<F>;
  const int64_t k = w.k, blocks = k / kBlockCodes, groups = w.groups_per_row();
  a.chunks = (blocks + Layout::kBlocksPerChunk - 1) / Layout::kBlocksPerChunk;
  a.chunk_bytes = Layout::kPlanes * kChunkBytes;
  a.bytes.reserve_zeroed(m * a.chunks * a.chunk_bytes);
  a.block_scales.reserve_zeroed(m * a.chunks * 16);
  a.group_sums.reserve_zeroed(m * groups);
  constexpr int kLanesPerBlock = 16 / Layout::kBlocksPerChunk;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < m; ++i) {
    const float* row = x + i * k;
    int8_t* bytes = a.bytes.data() + i * a.chunks * a.chunk_bytes;
    float* scales = a.block_scales.data() + i * a.chunks * 16;
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i t[2];
      const float d = quantize_block(row + b * kBlockCodes, t);
      const int64_t chunk = b / Layout::kBlocksPerChunk, slot = b % Layout::kBlocksPerChunk;
      int8_t* c = bytes + chunk * a.chunk_bytes;
      if constexpr (F == Format::kInt4) {
        const __m512i t_even = _mm512_permutex2var_epi32(t[0], even, t[1]);
        const __m512i t_odd = _mm512_permutex2var_epi32(t[0], odd, t[1]);
        split_bytes(t_even, c + 16 * slot, c + 2 * kChunkBytes + 16 * slot);
        split_bytes(t_odd, c + kChunkBytes + 16 * slot, c + 3 * kChunkBytes + 16 * slot);
      } else {
        for (int v = 0; v < 2; ++v) split_bytes(t[v], c + 32 * slot + 16 * v, c + kChunkBytes + 32 * slot + 16 * v);
      }
      std::fill_n(scales + chunk * 16 + slot * kLanesPerBlock, kLanesPerBlock, d);
    }
    // A partial last chunk: its missing blocks multiply zero activations with a zero scale.
    for (int64_t b = blocks; b < a.chunks * Layout::kBlocksPerChunk; ++b) {
      const int64_t chunk = b / Layout::kBlocksPerChunk, slot = b % Layout::kBlocksPerChunk;
      int8_t* c = bytes + chunk * a.chunk_bytes;
      const int block_bytes = kChunkBytes / Layout::kBlocksPerChunk;
      for (int p = 0; p < Layout::kPlanes; ++p) std::memset(c + p * kChunkBytes + slot * block_bytes, 0, block_bytes);
      std::fill_n(scales + chunk * 16 + slot * kLanesPerBlock, kLanesPerBlock, 0.0f);
    }
    float* sums = a.group_sums.data() + i * groups;
    for (int64_t g = 0; g < groups; ++g) sums[g] = group_sum(row, g * w.group_size, std::min(k, (g + 1) * w.group_size));
  }
}

// Lane l of a chunk belongs to block l / (16 / kBlocksPerChunk) of the chunk.
template <Format F>
METAL_MARLIN_AVX512_VNNI inline __m512i block_of_lane() {
  return F == Format::kInt4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                            : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
}

// How a row's chunks find their blocks' scales s: one group per block (loaded per chunk), whole
// groups per chunk (one scale broadcast), or anything else (read from a per-row table).
enum class ScaleLayout { kGroupPerBlock, kChunksPerGroup, kTable };

template <Format F>
ScaleLayout scale_layout(const QuantizedMatrix& w) {
  const int64_t bpg = w.blocks_per_group();
  if (bpg == 1) return ScaleLayout::kGroupPerBlock;
  if (bpg % VnniLayout<F>::kBlocksPerChunk == 0) return ScaleLayout::kChunksPerGroup;
  return ScaleLayout::kTable;
}

template <Format F, int M, ScaleLayout kScales>
METAL_MARLIN_AVX512_VNNI void rows(const QuantizedMatrix& w, const VnniActivations& a, int64_t begin, int64_t end,
                                   float* out, float* table) {
  using Layout = VnniLayout<F>;
  constexpr int kBpc = Layout::kBlocksPerChunk;
  const int64_t groups = w.groups_per_row(), blocks = w.blocks_per_row(), bpg = w.blocks_per_group();
  const int64_t chunks = a.chunks;
  const int64_t row_bytes = w.words_per_row() * 4;
  const int64_t tail_bytes = row_bytes - (chunks - 1) * kChunkBytes;  // 1..64
  const __mmask64 tail_mask = tail_bytes == 64 ? ~__mmask64(0) : (__mmask64(1) << tail_bytes) - 1;
  const __m512i lane_block = block_of_lane<F>();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t n = begin; n < end; ++n) {
    // The offset terms o_g * sum_g(x) of every activation row.
    const uint16_t* s16 = w.row_scales(n);
    const uint16_t* o16 = w.row_offsets(n);
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 live = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
      const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s16 + g));
      const __m512 o = o16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, o16 + g))
                           : _mm512_mul_ps(s, _mm512_set1_ps(-kSymmetricMid<F>));
      for (int i = 0; i < M; ++i) {
        acc[i] = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(live, a.group_sums.data() + i * groups + g), acc[i]);
      }
    }
    if constexpr (kScales == ScaleLayout::kTable) {
      for (int64_t b = 0; b < blocks; ++b) table[b] = half_to_float(s16[b / bpg]);
      for (int64_t b = blocks; b < chunks * kBpc; ++b) table[b] = 0.0f;
    }

    const auto* codes = reinterpret_cast<const uint8_t*>(w.row_words(n));
    for (int64_t c = 0; c < chunks; ++c, codes += kChunkBytes) {
      _mm_prefetch(reinterpret_cast<const char*>(codes) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = c + 1 < chunks ? _mm512_loadu_si512(codes) : _mm512_maskz_loadu_epi8(tail_mask, codes);
      // s of the block of each lane (zero past the row's last block: those lanes sum zero activations).
      __m512 s;
      if constexpr (kScales == ScaleLayout::kGroupPerBlock) {
        const int64_t left = blocks - c * kBpc;
        const __mmask8 live = left >= kBpc ? __mmask8((1u << kBpc) - 1) : __mmask8((1u << left) - 1);
        const __m128 four = _mm_cvtph_ps(_mm_maskz_loadu_epi16(live, s16 + c * kBpc));
        s = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(four));
      } else if constexpr (kScales == ScaleLayout::kChunksPerGroup) {
        s = _mm512_set1_ps(half_to_float(s16[c * kBpc / bpg]));
      } else {
        s = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(table + c * kBpc)));
      }
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const int8_t* x = a.bytes.data() + (i * chunks + c) * a.chunk_bytes;
        __m512i high, low;
        if constexpr (F == Format::kInt4) {
          const __m512i lo_codes = _mm512_and_si512(v, nibble);
          const __m512i hi_codes = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo_codes, _mm512_load_si512(x));
          high = _mm512_dpbusd_epi32(high, hi_codes, _mm512_load_si512(x + kChunkBytes));
          low = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo_codes, _mm512_load_si512(x + 2 * kChunkBytes));
          low = _mm512_dpbusd_epi32(low, hi_codes, _mm512_load_si512(x + 3 * kChunkBytes));
        } else {
          high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_load_si512(x));
          low = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_load_si512(x + kChunkBytes));
        }
        const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(high, 8), low));
        const __m512 d = _mm512_load_ps(a.block_scales.data() + (i * chunks + c) * 16);
        acc[i] = _mm512_fmadd_ps(sums, _mm512_mul_ps(s, d), acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) out[i * w.n + n] = _mm512_reduce_add_ps(acc[i]);
  }
}
template <Format F, ScaleLayout kScales>
void rows_any_m(const QuantizedMatrix& w, const VnniActivations& a, int64_t m, int64_t begin, int64_t end,
                float* out) {
  thread_local AlignedFloats table;
  float* scratch = nullptr;
  if constexpr (kScales == ScaleLayout::kTable) {
    table.reserve_zeroed(a.chunks * VnniLayout<F>::kBlocksPerChunk);
    scratch = table.data();
  }
  switch (m) {
    case 1: return rows<F, 1, kScales>(w, a, begin, end, out, scratch);
    case 2: return rows<F, 2, kScales>(w, a, begin, end, out, scratch);
    case 3: return rows<F, 3, kScales>(w, a, begin, end, out, scratch);
    case 4: return rows<F, 4, kScales>(w, a, begin, end, out, scratch);
    case 5: return rows<F, 5, kScales>(w, a, begin, end, out, scratch);
    case 6: return rows<F, 6, kScales>(w, a, begin, end, out, scratch);
    case 7: return rows<F, 7, kScales>(w, a, begin, end, out, scratch);
    default: return rows<F, 8, kScales>(w, a, begin, end, out, scratch);
  }
}

template <Format F>
void rows_any_layout(const QuantizedMatrix& w, const VnniActivations& a, int64_t m, int64_t begin, int64_t end,
                     float* out) {
  switch (scale_layout<F>(w)) {
    case ScaleLayout::kGroupPerBlock: return rows_any_m<F, ScaleLayout::kGroupPerBlock>(w, a, m, begin, end, out);
    case ScaleLayout::kChunksPerGroup: return rows_any_m<F, ScaleLayout::kChunksPerGroup>(w, a, m, begin, end, out);
    case ScaleLayout::kTable: return rows_any_m<F, ScaleLayout::kTable>(w, a, m, begin, end, out);
  }
}

}  // namespace

bool cpu_has_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

void prepare_gemv_vnni(const QuantizedMatrix& w, const float* x, int64_t m, VnniActivations& a) {
  if (w.format == Format::kInt4) return prepare<Format::kInt4>(w, x, m, a);
  prepare<Format::kInt8>(w, x, m, a);
}

void gemv_rows_vnni(const QuantizedMatrix& w, const VnniActivations& a, int64_t m, int64_t row_begin,
                    int64_t row_end, float* out) {
  if (w.format == Format::kInt4) return rows_any_layout<Format::kInt4>(w, a, m, row_begin, row_end, out);
  rows_any_layout<Format::kInt8>(w, a, m, row_begin, row_end, out);
}

}  // namespace metal_marlin::cpu

#endif  // METAL_MARLIN_X86
