// AVX-512 build of the per-token math of transform.cpp, used alongside the AVX-512 kernels, where
// at small K and N (MiniLM's 384 x 1536) the O(K + N) work per token is as large as the kernel's.
// Bit-identical to transform.cpp: every element sees the same IEEE operations in the same order
// (the Hadamard butterflies are adds and subtracts whatever their grouping; the chunk sums use the
// same four partial sums), and contracting a * b + c into an FMA, which would round once instead
// of twice, is switched off for this file (the butterflies' explicit FMAs multiply by +-1, exact).
#include <immintrin.h>

#include <cmath>

#include "kernel_api.h"
#include "transform.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC optimize("fp-contract=off")

namespace pyquant {
namespace cpu {
namespace avx512 {
namespace {

inline __mmask16 tail_mask(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// Butterfly stage `Len` (1, 2, 4 or 8) inside a vector: lanes Len apart, (a, b) -> (a + b, a - b),
// as one FMA: partner + v * (+1 or -1). The product by +-1 is exact and the FMA rounds once, so
// each lane gets the IEEE a + b (lower lane: v + partner) or a - b (upper: partner - v) of the
// portable stage. One shuffle and one FMA per stage (a shuffle port and the two vector ports are
// what bound these loops).
template <int Len>
inline __m512 lane_stage(__m512 v) {
  __m512 partner;
  if constexpr (Len == 1) partner = _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));
  else if constexpr (Len == 2) partner = _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2));
  else if constexpr (Len == 4) partner = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1));
  else partner = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2));
  constexpr __mmask16 upper = Len == 1 ? 0xAAAA : Len == 2 ? 0xCCCC : Len == 4 ? 0xF0F0 : 0xFF00;
  const __m512 sign = _mm512_mask_blend_ps(upper, _mm512_set1_ps(1.f), _mm512_set1_ps(-1.f));
  return _mm512_fmadd_ps(v, sign, partner);
}

// The first four stages (len 1, 2, 4, 8) of a 16-element block.
inline __m512 fwht16(__m512 v) { return lane_stage<8>(lane_stage<4>(lane_stage<2>(lane_stage<1>(v)))); }

// The stages len 16 .. 8R of a block of 16R elements held in R vectors, in the portable order.
template <int R>
inline void fwht_across(__m512* v) {
#pragma GCC unroll 8
  for (int len = 1; len < R; len *= 2)
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
      if (!(i & len)) {
        const __m512 a = v[i], b = v[i + len];
        v[i] = _mm512_add_ps(a, b);
        v[i + len] = _mm512_sub_ps(a, b);
      }
}

template <int K>
inline __m512 splat(__m512 p) { return _mm512_permute_ps(p, _MM_SHUFFLE(K, K, K, K)); }

// q = round(v * inv) clamped to +-kQMax, and hi = (q + 128) >> 8 (see transform.cpp's split),
// as int32 lanes. lo = q - 256 hi is q's low byte read as int8, which the narrowing to bytes
// (to_planes) takes without computing it.
inline void split(__m512 v, __m512 inv, __m512i* hi, __m512i* q) {
  const __m512 qmax = _mm512_set1_ps(static_cast<float>(kQMax));
  *q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), _mm512_sub_ps(_mm512_setzero_ps(), qmax)), qmax));
  *hi = _mm512_srai_epi32(_mm512_add_epi32(*q, _mm512_set1_epi32(128)), 8);
}

// 16 chunks as 64 int8 in element order (4 vectors of 4 chunks, each narrowed to 16 bytes) ->
// the 4 planes of 16 lanes: bytes within each 128-bit lane to [e0 of 4 chunks, e1, e2, e3], then
// dword i of every lane to lane i.
inline __m512i to_planes(__m512i q0, __m512i q1, __m512i q2, __m512i q3) {
  __m512i v = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(q0));
  v = _mm512_inserti32x4(v, _mm512_cvtepi32_epi8(q1), 1);
  v = _mm512_inserti32x4(v, _mm512_cvtepi32_epi8(q2), 2);
  v = _mm512_inserti32x4(v, _mm512_cvtepi32_epi8(q3), 3);
  const __m512i bytes = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  v = _mm512_shuffle_epi8(v, bytes);
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
}

}  // namespace

void fwht(float* x, int64_t n, int64_t h) {
  if (h < 16) {
    cpu::fwht(x, n, h);
    return;
  }
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(x + i, fwht16(_mm512_loadu_ps(x + i)));
  for (int64_t base = 0; base < n; base += h) {
    float* v = x + base;
    int64_t len = 16;
    for (; 4 * len <= h; len *= 4)
      for (int64_t i = 0; i < h; i += 4 * len)
        for (int64_t j = i; j < i + len; j += 16) {
          const __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + len);
          const __m512 c = _mm512_loadu_ps(v + j + 2 * len), d = _mm512_loadu_ps(v + j + 3 * len);
          const __m512 s0 = _mm512_add_ps(a, b), d0 = _mm512_sub_ps(a, b), s1 = _mm512_add_ps(c, d), d1 = _mm512_sub_ps(c, d);
          _mm512_storeu_ps(v + j, _mm512_add_ps(s0, s1));
          _mm512_storeu_ps(v + j + len, _mm512_add_ps(d0, d1));
          _mm512_storeu_ps(v + j + 2 * len, _mm512_sub_ps(s0, s1));
          _mm512_storeu_ps(v + j + 3 * len, _mm512_sub_ps(d0, d1));
        }
    if (len < h)
      for (int64_t j = 0; j < len; j += 16) {
        const __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + len);
        _mm512_storeu_ps(v + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(v + j + len, _mm512_sub_ps(a, b));
      }
  }
}

void widen_half(const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
  }
}

void narrow_bf16(const float* x, int64_t n, uint16_t* out) {
  const __m512i one = _mm512_set1_epi32(1), half_ulp = _mm512_set1_epi32(0x7FFF), nan = _mm512_set1_epi32(0x7FC0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), half_ulp);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
    _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtepi32_epi16(r));
  }
}

// vcvtps2ph rounds every non-NaN value as the portable build does (IEEE, to nearest even); a NaN
// keeps its payload there, so NaN lanes are set to the portable build's sign | 0x7E00.
void narrow_half(const float* x, int64_t n, uint16_t* out) {
  const __m256i nan = _mm256_set1_epi16(0x7E00), sign = _mm256_set1_epi16(static_cast<short>(0x8000));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    h = _mm256_mask_mov_epi16(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm256_or_si256(_mm256_and_si256(h, sign), nan));
    _mm256_mask_storeu_epi16(out + i, m, h);
  }
}

void scale_input(const float* x, const float* su, int64_t K, float* xt) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(K - k);
    _mm512_mask_storeu_ps(xt + k, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, su + k)));
  }
}

void scale_input(const uint16_t* x_bf16, const float* su, int64_t K, float* xt) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(K - k);
    const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x_bf16 + k)), 16));
    _mm512_mask_storeu_ps(xt + k, m, _mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, su + k)));
  }
}

namespace {

// The per-chunk half of transform_activations, 16 elements (4 chunks) at a time, in element order:
// chunk sums in double (lanes 0-3 / 4-7 of lo hold partial sums 0 / 1, of hi 2 / 3), A^T per
// chunk (rows of A broadcast to each 128-bit lane), max |x'|.
struct ChunkMath {
  __m512 a0, a1, a2, a3, mx = _mm512_setzero_ps();
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  explicit ChunkMath(const float* A)
      : a0(_mm512_broadcast_f32x4(_mm_loadu_ps(A))), a1(_mm512_broadcast_f32x4(_mm_loadu_ps(A + 4))),
        a2(_mm512_broadcast_f32x4(_mm_loadu_ps(A + 8))), a3(_mm512_broadcast_f32x4(_mm_loadu_ps(A + 12))) {}
  // p: 16 elements of H x / sqrt(had); writes their A^T to dst (lanes in m).
  inline void step(__m512 p, float* dst, __mmask16 m) {
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(p)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1))));
    const __m512 r = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(splat<0>(p), a0), _mm512_mul_ps(splat<1>(p), a1)),
                      _mm512_mul_ps(splat<2>(p), a2)),
        _mm512_mul_ps(splat<3>(p), a3));
    _mm512_mask_storeu_ps(dst, m, r);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(r));
  }
  // (s0 + s1) + (s2 + s3) per component, as in transform.cpp
  double finish(const float* b, float* amax) const {
    const __m256d s01 = _mm256_add_pd(_mm512_castpd512_pd256(lo), _mm512_extractf64x4_pd(lo, 1));
    const __m256d s23 = _mm256_add_pd(_mm512_castpd512_pd256(hi), _mm512_extractf64x4_pd(hi, 1));
    double s[4];
    _mm256_storeu_pd(s, _mm256_add_pd(s01, s23));
    return finish_constant(s, b, _mm512_reduce_max_ps(mx), amax);
  }
};

// The Hadamard block of 16R elements at p, loaded into R registers and transformed there.
template <int R>
inline void hadamard_block(const float* p, __m512* v) {
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) v[i] = fwht16(_mm512_loadu_ps(p + 16 * i));
  fwht_across<R>(v);
}

// One Hadamard block at a time, whole in registers: every stage, the scale and the chunk math in
// one pass over the token (separate passes stored and reloaded it five times at had = 128: 1.23
// -> 0.97 TSC ticks per element at K = 1536; the output side below 0.92 -> 0.47).
template <int R>
void transform_blocks(float* xt, int64_t K, float scale, ChunkMath& cm) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t base = 0; base < K; base += 16 * R) {
    __m512 v[R];
    hadamard_block<R>(xt + base, v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) cm.step(_mm512_mul_ps(v[i], sc), xt + base + 16 * i, 0xFFFF);
  }
}

// In place: row <- row * scale * sv (+ bias), one block of 16R elements in registers (see above).
template <int R>
void output_blocks(float* row, int64_t N, float scale, const float* sv, const float* bias) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t base = 0; base < N; base += 16 * R) {
    __m512 v[R];
    hadamard_block<R>(row + base, v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const int64_t n = base + 16 * i;
      __m512 y = _mm512_mul_ps(_mm512_mul_ps(v[i], sc), _mm512_loadu_ps(sv + n));
      if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + n));
      _mm512_storeu_ps(row + n, y);
    }
  }
}

}  // namespace

double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax) {
  ChunkMath cm(A);
  const float scale = had > 1 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(had))) : 1.f;
  switch (had) {  // blocks of up to 256 elements fit the 32 vector registers with the constants
    case 16: transform_blocks<1>(xt, K, scale, cm); return cm.finish(b, amax);
    case 32: transform_blocks<2>(xt, K, scale, cm); return cm.finish(b, amax);
    case 64: transform_blocks<4>(xt, K, scale, cm); return cm.finish(b, amax);
    case 128: transform_blocks<8>(xt, K, scale, cm); return cm.finish(b, amax);
    case 256: transform_blocks<16>(xt, K, scale, cm); return cm.finish(b, amax);
    default: break;
  }
  if (had > 1) fwht(xt, K, had);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 m = tail_mask(K - j);
    cm.step(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xt + j), sc), xt + j, m);
  }
  return cm.finish(b, amax);
}

double encode_int(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst) {
  const IntScale q = int_scale(amax);
  if (q.pre != 1.f)
    for (int64_t i = 0; i < K; ++i) xt[i] *= q.pre;
  const __m512 inv = _mm512_set1_ps(q.inv);
  // The zero padding past K encodes to zero bytes: stored, not computed (MiniLM's K = 384 pads
  // its two groups by a quarter).
  const int64_t chunks = (K + 3) / 4;
  for (int64_t g = 0; g < G; ++g) {
    const float* src = xt + g * kGroupElems;
    int8_t* out = dst + g * 512;
    if (plane) {  // [hi planes][lo planes] x 64 bytes
      for (int64_t p0 = 0; p0 < kGroupCodes; p0 += 16) {  // 16 chunks -> 16 lanes of each plane
        __m512i hp = _mm512_setzero_si512(), lp = _mm512_setzero_si512();
        if (g * kGroupCodes + p0 < chunks) {
          __m512i h[4], v[4];
          for (int c = 0; c < 4; ++c) split(_mm512_loadu_ps(src + 4 * p0 + 16 * c), inv, &h[c], &v[c]);
          hp = to_planes(h[0], h[1], h[2], h[3]);
          lp = to_planes(v[0], v[1], v[2], v[3]);
        }
        // (lane indices spelled out: the extract takes an immediate, which an unoptimized build
        // would not get from a loop)
        const auto store_planes = [p0](int8_t* planes, __m512i v) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + p0), _mm512_castsi512_si128(v));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + 64 + p0), _mm512_extracti32x4_epi32(v, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + 128 + p0), _mm512_extracti32x4_epi32(v, 2));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + 192 + p0), _mm512_extracti32x4_epi32(v, 3));
        };
        store_planes(out, hp);
        store_planes(out + 256, lp);
      }
    } else {  // chunk j: 4 hi bytes, then 4 lo bytes
      for (int64_t e = 0; e < kGroupElems; e += 16) {
        __m128i hb = _mm_setzero_si128(), lb = _mm_setzero_si128();
        if (g * kGroupElems + e < K) {
          __m512i h, v;
          split(_mm512_loadu_ps(src + e), inv, &h, &v);
          hb = _mm512_cvtepi32_epi8(h);
          lb = _mm512_cvtepi32_epi8(v);
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * e), _mm_unpacklo_epi32(hb, lb));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * e + 16), _mm_unpackhi_epi32(hb, lb));
      }
    }
  }
  return q.s;
}

void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row) {
  const __m512 va = _mm512_set1_ps(a), vc = _mm512_set1_ps(c);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = tail_mask(N - n);
    _mm512_mask_storeu_ps(row + n, m, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, d + n)), va), vc));
  }
}

void dequant_row(const float* d, int64_t N, float a, float c, float* row) {
  const __m512 va = _mm512_set1_ps(a), vc = _mm512_set1_ps(c);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = tail_mask(N - n);
    _mm512_mask_storeu_ps(row + n, m, _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, d + n), va), vc));
  }
}

void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias) {
  const float scale = had > 1 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(had))) : 1.f;
  switch (had) {
    case 16: output_blocks<1>(row, N, scale, sv, bias); return;
    case 32: output_blocks<2>(row, N, scale, sv, bias); return;
    case 64: output_blocks<4>(row, N, scale, sv, bias); return;
    case 128: output_blocks<8>(row, N, scale, sv, bias); return;
    case 256: output_blocks<16>(row, N, scale, sv, bias); return;
    default: break;
  }
  if (had > 1) fwht(row, N, had);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = tail_mask(N - n);
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + n), sc), _mm512_maskz_loadu_ps(m, sv + n));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + n));
    _mm512_mask_storeu_ps(row + n, m, v);
  }
}

}  // namespace avx512

const TransformOps kAvx512Math = {avx512::widen_half, avx512::scale_input, avx512::scale_input, avx512::transform_activations,
                                  avx512::encode_int, avx512::dequant_row, avx512::dequant_row,
                                  avx512::output_transform, avx512::narrow_bf16, avx512::narrow_half};

}  // namespace cpu
}  // namespace pyquant

#pragma GCC pop_options
