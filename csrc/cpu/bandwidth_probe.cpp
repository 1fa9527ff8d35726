// A streaming read of a large buffer: the memory bandwidth the GEMV kernels are measured against.
// Same thread pool and chunking as the kernels; four independent 64-bit-lane sums per vector width
// keep enough loads in flight that the loop is bound by memory, not by the adds.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/simd.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace metal_marlin::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t(1) << 20;  // per task: large enough to amortise the hand-out

uint64_t sum_scalar(const unsigned char* p, int64_t bytes) {
  uint64_t acc[4] = {};
  int64_t i = 0;
  for (; i + 32 <= bytes; i += 32) {
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] += v;
    }
  }
  for (; i < bytes; ++i) acc[0] += p[i];
  return acc[0] + acc[1] + acc[2] + acc[3];
}

#if METAL_MARLIN_X86
METAL_MARLIN_AVX2 uint64_t sum_avx2(const unsigned char* p, int64_t bytes) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    for (int j = 0; j < 4; ++j) {
      acc[j] = _mm256_add_epi64(acc[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * j)));
    }
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3])));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_scalar(p + i, bytes - i);
}

METAL_MARLIN_AVX512 uint64_t sum_avx512(const unsigned char* p, int64_t bytes) {
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_add_epi64(acc[j], _mm512_loadu_si512(p + i + 64 * j));
  }
  const __m512i total = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
  return uint64_t(_mm512_reduce_add_epi64(total)) + sum_scalar(p + i, bytes - i);
}
#endif

uint64_t sum_bytes(SimdLevel level, const unsigned char* p, int64_t bytes) {
  switch (level) {
#if METAL_MARLIN_X86
    case SimdLevel::kAvx512Amx:
    case SimdLevel::kAvx512Vnni:
    case SimdLevel::kAvx512: return sum_avx512(p, bytes);
    case SimdLevel::kAvx2: return sum_avx2(p, bytes);
#endif
    default: return sum_scalar(p, bytes);
  }
}

}  // namespace

uint64_t read_bandwidth_probe(const void* data, int64_t bytes, int n_threads) {
  const auto* p = static_cast<const unsigned char*>(data);
  const SimdLevel level = current_simd_level();
  const int64_t n_tasks = (bytes + kChunkBytes - 1) / kChunkBytes;
  const int threads = plan_threads(n_threads, n_tasks);
  struct alignas(64) Partial {  // one cache line per thread: no false sharing
    uint64_t sum = 0;
  };
  std::vector<Partial> partial(static_cast<size_t>(threads));
  parallel_for(threads, n_tasks, [&](int64_t task, int thread) {
    const int64_t begin = task * kChunkBytes;
    partial[size_t(thread)].sum += sum_bytes(level, p + begin, std::min(kChunkBytes, bytes - begin));
  });
  uint64_t sum = 0;
  for (const Partial& part : partial) sum += part.sum;
  return sum;
}

}  // namespace metal_marlin::cpu
