// AVX2 + FMA + F16C build of the per-token math of transform.cpp, used with the AVX2 kernels: on
// CPUs without AVX-512 (Zen 1-3, Haswell to Alder Lake) the portable build's Hadamard passes and
// its element-by-element 16-bit encoding took a fifth of a MiniLM layer call at 29 tokens.
// Bit-identical to transform.cpp, as transform_avx512.cpp is (same IEEE operations in the same
// order per element; no FMA contraction; the explicit FMAs of the butterflies multiply by +-1).
// What it does not speed up (bf16 inputs, fp16 / bf16 outputs, float mode) is the portable code.
#include <immintrin.h>

#include <cmath>

#include "kernel_api.h"
#include "transform.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("fp-contract=off")

namespace pyquant {
namespace cpu {
namespace avx2 {
namespace {

// Butterfly stage `Len` (1, 2 or 4) inside a vector of 8: lanes Len apart, (a, b) -> (a + b, a - b)
// as partner + v * (+1 or -1), one FMA (exact product, one rounding: the portable stage's bits).
template <int Len>
inline __m256 lane_stage(__m256 v) {
  __m256 partner, sign;
  if constexpr (Len == 1) {
    partner = _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));
    sign = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  } else if constexpr (Len == 2) {
    partner = _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2));
    sign = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  } else {
    partner = _mm256_permute2f128_ps(v, v, 1);
    sign = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  }
  return _mm256_fmadd_ps(v, sign, partner);
}

inline __m256 fwht8(__m256 v) { return lane_stage<4>(lane_stage<2>(lane_stage<1>(v))); }

// Stages len 8 .. 4R of a block of 8R elements in R registers, in the portable order.
template <int R>
inline void fwht_across(__m256* v) {
#pragma GCC unroll 8
  for (int len = 1; len < R; len *= 2)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      if (!(i & len)) {
        const __m256 a = v[i], b = v[i + len];
        v[i] = _mm256_add_ps(a, b);
        v[i + len] = _mm256_sub_ps(a, b);
      }
}

// The first min(h, 64) elements' stages of every block, 8R elements at a time in registers.
template <int R>
void fwht_registers(float* x, int64_t n) {
  for (int64_t base = 0; base < n; base += 8 * R) {
    __m256 v[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) v[i] = fwht8(_mm256_loadu_ps(x + base + 8 * i));
    fwht_across<R>(v);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) _mm256_storeu_ps(x + base + 8 * i, v[i]);
  }
}

template <int K>
inline __m256 splat(__m256 p) { return _mm256_permute_ps(p, _MM_SHUFFLE(K, K, K, K)); }

}  // namespace

void fwht(float* x, int64_t n, int64_t h) {
  if (h < 8) {
    cpu::fwht(x, n, h);
    return;
  }
  // (8 registers of the 16: the rest hold the loop's addresses and the stage constants)
  switch (h) {
    case 8: fwht_registers<1>(x, n); return;
    case 16: fwht_registers<2>(x, n); return;
    case 32: fwht_registers<4>(x, n); return;
    default: fwht_registers<8>(x, n); break;
  }
  for (int64_t base = 0; base < n; base += h) {  // the stages from len 64 on, two per pass
    float* v = x + base;
    int64_t len = 64;
    for (; 4 * len <= h; len *= 4)
      for (int64_t i = 0; i < h; i += 4 * len)
        for (int64_t j = i; j < i + len; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + len);
          const __m256 c = _mm256_loadu_ps(v + j + 2 * len), d = _mm256_loadu_ps(v + j + 3 * len);
          const __m256 s0 = _mm256_add_ps(a, b), d0 = _mm256_sub_ps(a, b), s1 = _mm256_add_ps(c, d),
                       d1 = _mm256_sub_ps(c, d);
          _mm256_storeu_ps(v + j, _mm256_add_ps(s0, s1));
          _mm256_storeu_ps(v + j + len, _mm256_add_ps(d0, d1));
          _mm256_storeu_ps(v + j + 2 * len, _mm256_sub_ps(s0, s1));
          _mm256_storeu_ps(v + j + 3 * len, _mm256_sub_ps(d0, d1));
        }
    if (len < h)
      for (int64_t j = 0; j < len; j += 8) {
        const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + len);
        _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(v + j + len, _mm256_sub_ps(a, b));
      }
  }
}

void widen_half(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  cpu::widen_half(h + i, n - i, out + i);
}

void scale_input(const float* x, const float* su, int64_t K, float* xt) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(xt + k, _mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(su + k)));
  for (; k < K; ++k) xt[k] = x[k] * su[k];
}

double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax) {
  float scale = 1.f;
  if (had > 1) {
    fwht(xt, K, had);
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(had)));
  }
  // Per run of 16 elements (4 chunks), chunk c's components go into partial sum set c, in double
  // (transform.cpp); a last partial run's chunks into sets 0, 1, 2. A^T per chunk with the rows of
  // A broadcast to both 128-bit lanes.
  const __m256 a0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(A));
  const __m256 a1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(A + 4));
  const __m256 a2 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(A + 8));
  const __m256 a3 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(A + 12));
  const __m256 sc = _mm256_set1_ps(scale), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256d sums[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256 mx = _mm256_setzero_ps();
  const auto two_chunks = [&](float* p, int set) {  // chunks at p and p + 4 into sets `set`, `set` + 1
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(p), sc);
    sums[set] = _mm256_add_pd(sums[set], _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    sums[set + 1] = _mm256_add_pd(sums[set + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    const __m256 r = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(splat<0>(v), a0), _mm256_mul_ps(splat<1>(v), a1)),
                      _mm256_mul_ps(splat<2>(v), a2)),
        _mm256_mul_ps(splat<3>(v), a3));
    _mm256_storeu_ps(p, r);
    mx = _mm256_max_ps(mx, _mm256_and_ps(r, abs_mask));
  };
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    two_chunks(xt + j, 0);
    two_chunks(xt + j + 8, 2);
  }
  if (j + 8 <= K) {
    two_chunks(xt + j, 0);
    j += 8;
  }
  double s[4];
  alignas(32) double part[4][4];
  for (int i = 0; i < 4; ++i) _mm256_store_pd(part[i], sums[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = 0.f;
  for (float v : lanes) m = m > v ? m : v;
  if (j < K) {  // one last chunk (K is a multiple of 4): set 0 or 2, as in transform.cpp
    const int set = K % 16 == 12 ? 2 : 0;
    const __m128 v = _mm_mul_ps(_mm_loadu_ps(xt + j), _mm256_castps256_ps128(sc));
    float p[4], r[4];
    _mm_storeu_ps(p, v);
    for (int i = 0; i < 4; ++i) part[set][i] += static_cast<double>(p[i]);
    for (int i = 0; i < 4; ++i) r[i] = ((p[0] * A[i] + p[1] * A[4 + i]) + p[2] * A[8 + i]) + p[3] * A[12 + i];
    for (int i = 0; i < 4; ++i) {
      xt[j + i] = r[i];
      const float a = std::fabs(r[i]);
      m = m > a ? m : a;
    }
  }
  for (int i = 0; i < 4; ++i) s[i] = (part[0][i] + part[1][i]) + (part[2][i] + part[3][i]);
  return finish_constant(s, b, m, amax);
}

double encode_int(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst) {
  if (!plane) return cpu::encode_int(xt, K, amax, G, plane, dst);  // (the natural layout: GEMMs only)
  const IntScale q = int_scale(amax);
  if (q.pre != 1.f)
    for (int64_t i = 0; i < K; ++i) xt[i] *= q.pre;
  const __m256 inv = _mm256_set1_ps(q.inv), qmax = _mm256_set1_ps(static_cast<float>(kQMax));
  const __m256 neg_qmax = _mm256_set1_ps(-static_cast<float>(kQMax));
  const __m256i round_hi = _mm256_set1_epi32(128);
  // bytes of each 128-bit lane from [4 chunks x e0..e3] to [e0 of the 4 chunks, e1, e2, e3]
  const __m128i by_element = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int64_t chunks = (K + 3) / 4;
  for (int64_t g = 0; g < G; ++g) {
    const float* src = xt + g * kGroupElems;
    int8_t* out = dst + g * 512;  // [hi planes][lo planes] x 64 bytes
    for (int64_t p0 = 0; p0 < kGroupCodes; p0 += 8) {  // 8 chunks -> 8 bytes of each plane
      __m128i h01 = _mm_setzero_si128(), h23 = h01, l01 = h01, l23 = h01;
      if (g * kGroupCodes + p0 < chunks) {  // (past K: zero padding, zero bytes)
        __m256i hi[4], lo[4];
        for (int c = 0; c < 4; ++c) {  // chunks 2c, 2c + 1 (one per 128-bit lane)
          const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(src + 4 * p0 + 8 * c), inv), neg_qmax), qmax);
          const __m256i qv = _mm256_cvtps_epi32(t);  // to nearest even, as transform.cpp's split
          hi[c] = _mm256_srai_epi32(_mm256_add_epi32(qv, round_hi), 8);
          lo[c] = _mm256_sub_epi32(qv, _mm256_slli_epi32(hi[c], 8));
        }
        // Saturating packs within 128-bit lanes (no value saturates: hi in [-127, 127], lo in
        // [-128, 127]): lane 0 gets chunks 0, 2, 4, 6 (4 bytes each), lane 1 chunks 1, 3, 5, 7.
        const auto planes = [&](const __m256i* v, __m128i* e01, __m128i* e23) {
          const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
          const __m128i even = _mm_shuffle_epi8(_mm256_castsi256_si128(b), by_element);
          const __m128i odd = _mm_shuffle_epi8(_mm256_extracti128_si256(b, 1), by_element);
          *e01 = _mm_unpacklo_epi8(even, odd);  // e0 of chunks 0..7, then e1
          *e23 = _mm_unpackhi_epi8(even, odd);  // e2, e3
        };
        planes(hi, &h01, &h23);
        planes(lo, &l01, &l23);
      }
      const auto store = [p0](int8_t* planes, __m128i e01, __m128i e23) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(planes + p0), e01);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(planes + 64 + p0), _mm_unpackhi_epi64(e01, e01));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(planes + 128 + p0), e23);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(planes + 192 + p0), _mm_unpackhi_epi64(e23, e23));
      };
      store(out, h01, h23);
      store(out + 256, l01, l23);
    }
  }
  return q.s;
}

void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row) {
  const __m256 va = _mm256_set1_ps(a), vc = _mm256_set1_ps(c);
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + n)));
    _mm256_storeu_ps(row + n, _mm256_add_ps(_mm256_mul_ps(v, va), vc));
  }
  for (; n < N; ++n) row[n] = static_cast<float>(d[n]) * a + c;
}

void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias) {
  float scale = 1.f;
  if (had > 1) {
    fwht(row, N, had);
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(had)));
  }
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + n), sc), _mm256_loadu_ps(sv + n));
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
    _mm256_storeu_ps(row + n, v);
  }
  for (; n < N; ++n) row[n] = bias ? row[n] * scale * sv[n] + bias[n] : row[n] * scale * sv[n];
}

}  // namespace avx2

const TransformOps kAvx2Math = {avx2::widen_half,         avx2::scale_input, cpu::scale_input,
                                avx2::transform_activations, avx2::encode_int,  avx2::dequant_row,
                                cpu::dequant_row,          avx2::output_transform, cpu::narrow_bf16,
                                cpu::narrow_half};

}  // namespace cpu
}  // namespace pyquant

#pragma GCC pop_options
