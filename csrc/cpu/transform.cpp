// The per-token math around the INT2 kernels, written with SSE2, the x86-64 baseline: this file is
// compiled once, for every CPU, so the activations the kernels see and the rounding of the
// outputs do not depend on the ISA the kernels run on (int mode is then bit-identical across
// ISAs). It is O(K + N) per token against O(N K) for the kernels.
#include "transform.h"

#include <emmintrin.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernel_api.h"

namespace pyquant {
namespace cpu {
namespace {

inline __m128 sign_mask(int a, int b, int c, int d) {
  return _mm_castsi128_ps(_mm_setr_epi32(a ? INT_MIN : 0, b ? INT_MIN : 0, c ? INT_MIN : 0, d ? INT_MIN : 0));
}

template <int I>
inline __m128 splat(__m128 v) { return _mm_shuffle_ps(v, v, _MM_SHUFFLE(I, I, I, I)); }

// (hi, lo) of round(v * inv), clamped to +-kQMax: q = 256 hi + lo, hi in [-127, 127], lo in [-128, 127].
inline void split(__m128 v, __m128 inv, __m128i* hi, __m128i* lo) {
  const __m128 qmax = _mm_set1_ps(static_cast<float>(kQMax));
  // cvtps rounds to nearest even (the default MXCSR mode).
  const __m128i q = _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(_mm_mul_ps(v, inv), _mm_sub_ps(_mm_setzero_ps(), qmax)), qmax));
  *hi = _mm_srai_epi32(_mm_add_epi32(q, _mm_set1_epi32(128)), 8);  // floor((q + 128) / 256)
  *lo = _mm_sub_epi32(q, _mm_slli_epi32(*hi, 8));
}

inline __m128i pack16(__m128i a, __m128i b, __m128i c, __m128i d) {  // 16 int32 in int8 range -> 16 int8
  return _mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, d));
}

}  // namespace

double finish_constant(const double* sums, const float* b, float mx, float* amax) {
  const double c = sums[0] * b[0] + sums[1] * b[1] + sums[2] * b[2] + sums[3] * b[3];
  // NaN or Inf anywhere in the token reaches the sums (max() may drop a NaN): a NaN scale then
  // makes every output NaN, as the reference's would be.
  *amax = std::isfinite(c) ? mx : std::numeric_limits<float>::quiet_NaN();
  return c;
}

IntScale int_scale(float amax) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(amax)) return {0.f, static_cast<double>(kNaN), 1.f};  // rounds to 0; the NaN scale makes the outputs NaN
  if (amax == 0.f) return {0.f, 0.f, 1.f};
  const float pre = amax < 0x1p-100f ? 0x1p100f : 1.f;  // amax * 2^100 >= 2^-49: inv stays finite
  return {static_cast<float>(kQMax) / (amax * pre), static_cast<double>(amax) / kQMax, pre};
}

void scale_input(const float* x, const float* su, int64_t K, float* xt) {
  for (int64_t k = 0; k < K; ++k) xt[k] = x[k] * su[k];
}

void scale_input(const uint16_t* x_bf16, const float* su, int64_t K, float* xt) {
  for (int64_t k = 0; k < K; ++k) {  // bf16 -> fp32 is a shift, which the compiler vectorizes
    const uint32_t bits = static_cast<uint32_t>(x_bf16[k]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    xt[k] = v * su[k];
  }
}

void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row) {
  for (int64_t n = 0; n < N; ++n) row[n] = static_cast<float>(d[n]) * a + c;
}

void dequant_row(const float* d, int64_t N, float a, float c, float* row) {
  for (int64_t n = 0; n < N; ++n) row[n] = d[n] * a + c;
}

void fwht(float* x, int64_t n, int64_t h) {
  if (h < 2) return;
  if (h == 2) {
    for (int64_t i = 0; i < n; i += 2) {
      const float a = x[i], b = x[i + 1];
      x[i] = a + b;
      x[i + 1] = a - b;
    }
    return;
  }
  // Stages 1 and 2 inside each vector of 4: [a b c d] -> [a+b a-b c+d c-d] -> [s0+s1 d0+d1 s0-s1 d0-d1].
  const __m128 odd = sign_mask(0, 1, 0, 1), high = sign_mask(0, 0, 1, 1);
  for (int64_t i = 0; i < n; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    const __m128 u = _mm_add_ps(_mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 2, 0, 0)),
                                _mm_xor_ps(_mm_shuffle_ps(v, v, _MM_SHUFFLE(3, 3, 1, 1)), odd));
    _mm_storeu_ps(x + i, _mm_add_ps(_mm_shuffle_ps(u, u, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm_xor_ps(_mm_shuffle_ps(u, u, _MM_SHUFFLE(3, 2, 3, 2)), high)));
  }
  // Then two stages per pass (radix 4) between vectors, and a last single stage if one is left.
  for (int64_t base = 0; base < n; base += h) {
    float* v = x + base;
    int64_t len = 4;
    for (; 4 * len <= h; len *= 4)
      for (int64_t i = 0; i < h; i += 4 * len)
        for (int64_t j = i; j < i + len; j += 4) {
          const __m128 a = _mm_loadu_ps(v + j), b = _mm_loadu_ps(v + j + len);
          const __m128 c = _mm_loadu_ps(v + j + 2 * len), d = _mm_loadu_ps(v + j + 3 * len);
          const __m128 s0 = _mm_add_ps(a, b), d0 = _mm_sub_ps(a, b), s1 = _mm_add_ps(c, d), d1 = _mm_sub_ps(c, d);
          _mm_storeu_ps(v + j, _mm_add_ps(s0, s1));
          _mm_storeu_ps(v + j + len, _mm_add_ps(d0, d1));
          _mm_storeu_ps(v + j + 2 * len, _mm_sub_ps(s0, s1));
          _mm_storeu_ps(v + j + 3 * len, _mm_sub_ps(d0, d1));
        }
    if (len < h)
      for (int64_t j = 0; j < len; j += 4) {
        const __m128 a = _mm_loadu_ps(v + j), b = _mm_loadu_ps(v + j + len);
        _mm_storeu_ps(v + j, _mm_add_ps(a, b));
        _mm_storeu_ps(v + j + len, _mm_sub_ps(a, b));
      }
  }
}

double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax) {
  float scale = 1.f;
  if (had > 1) {
    fwht(xt, K, had);
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(had)));
  }
  // Per chunk x' (4 floats): A^T x' = x'0 A[0, :] + x'1 A[1, :] + x'2 A[2, :] + x'3 A[3, :].
  const __m128 a0 = _mm_loadu_ps(A), a1 = _mm_loadu_ps(A + 4), a2 = _mm_loadu_ps(A + 8), a3 = _mm_loadu_ps(A + 12);
  const __m128 sc = _mm_set1_ps(scale), abs_mask = _mm_castsi128_ps(_mm_set1_epi32(INT_MAX));
  // Sum of the chunks x'_j in double, in four partial sums (chunk j into sum j % 4) combined as
  // (s0 + s1) + (s2 + s3): the order the AVX-512 version adds in, so both give the same bits.
  __m128d s01[4], s23[4];
  for (int i = 0; i < 4; ++i) s01[i] = s23[i] = _mm_setzero_pd();
  __m128 mx = _mm_setzero_ps();
  auto chunk = [&](int64_t j, __m128d& sum01, __m128d& sum23) {
    const __m128 p = _mm_mul_ps(_mm_loadu_ps(xt + j), sc);
    sum01 = _mm_add_pd(sum01, _mm_cvtps_pd(p));
    sum23 = _mm_add_pd(sum23, _mm_cvtps_pd(_mm_movehl_ps(p, p)));
    const __m128 r = _mm_add_ps(_mm_add_ps(_mm_add_ps(_mm_mul_ps(splat<0>(p), a0), _mm_mul_ps(splat<1>(p), a1)),
                                           _mm_mul_ps(splat<2>(p), a2)),
                                _mm_mul_ps(splat<3>(p), a3));
    _mm_storeu_ps(xt + j, r);
    mx = _mm_max_ps(mx, _mm_and_ps(r, abs_mask));
  };
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    chunk(j, s01[0], s23[0]);
    chunk(j + 4, s01[1], s23[1]);
    chunk(j + 8, s01[2], s23[2]);
    chunk(j + 12, s01[3], s23[3]);
  }
  for (int set = 0; j < K; j += 4, ++set) chunk(j, s01[set], s23[set]);
  mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
  mx = _mm_max_ps(mx, splat<1>(mx));
  double s[4];
  _mm_storeu_pd(s, _mm_add_pd(_mm_add_pd(s01[0], s01[1]), _mm_add_pd(s01[2], s01[3])));
  _mm_storeu_pd(s + 2, _mm_add_pd(_mm_add_pd(s23[0], s23[1]), _mm_add_pd(s23[2], s23[3])));
  return finish_constant(s, b, _mm_cvtss_f32(mx), amax);
}

double encode_int(float* xt, float amax, int64_t G, bool plane, int8_t* dst) {
  const IntScale q = int_scale(amax);
  if (q.pre != 1.f)
    for (int64_t i = 0; i < G * kGroupElems; ++i) xt[i] *= q.pre;
  const __m128 inv = _mm_set1_ps(q.inv);
  for (int64_t g = 0; g < G; ++g) {
    const float* src = xt + g * kGroupElems;
    if (plane) {
      int8_t* hi_dst = dst + g * 512;
      for (int64_t p0 = 0; p0 < kGroupCodes; p0 += 16) {  // 16 chunks -> 16 lanes of each plane
        __m128i h[4][4], l[4][4];                          // [4 chunks][plane]
        for (int c = 0; c < 4; ++c) {
          const float* s = src + 4 * (p0 + 4 * c);
          __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + 4), r2 = _mm_loadu_ps(s + 8), r3 = _mm_loadu_ps(s + 12);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_i: element i of 4 consecutive chunks
          split(r0, inv, &h[c][0], &l[c][0]);
          split(r1, inv, &h[c][1], &l[c][1]);
          split(r2, inv, &h[c][2], &l[c][2]);
          split(r3, inv, &h[c][3], &l[c][3]);
        }
        for (int i = 0; i < 4; ++i) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(hi_dst + i * 64 + p0), pack16(h[0][i], h[1][i], h[2][i], h[3][i]));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(hi_dst + 256 + i * 64 + p0), pack16(l[0][i], l[1][i], l[2][i], l[3][i]));
        }
      }
    } else {
      int8_t* out = dst + g * 512;  // chunk j: 4 hi bytes, then 4 lo bytes
      for (int64_t e = 0; e < kGroupElems; e += 16) {
        __m128i h[4], l[4];
        for (int c = 0; c < 4; ++c) split(_mm_loadu_ps(src + e + 4 * c), inv, &h[c], &l[c]);
        const __m128i hb = pack16(h[0], h[1], h[2], h[3]), lb = pack16(l[0], l[1], l[2], l[3]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * e), _mm_unpacklo_epi32(hb, lb));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * e + 16), _mm_unpackhi_epi32(hb, lb));
      }
    }
  }
  return q.s;
}

void encode_float(const float* xt, int64_t G, float* dst) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t p0 = 0; p0 < kGroupCodes; p0 += 4) {
      const float* s = xt + g * kGroupElems + 4 * p0;
      __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + 4), r2 = _mm_loadu_ps(s + 8), r3 = _mm_loadu_ps(s + 12);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* d = dst + g * kGroupElems + p0;
      _mm_storeu_ps(d, r0);
      _mm_storeu_ps(d + 64, r1);
      _mm_storeu_ps(d + 128, r2);
      _mm_storeu_ps(d + 192, r3);
    }
}

void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias) {
  float scale = 1.f;
  if (had > 1) {
    fwht(row, N, had);
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(had)));
  }
  if (bias)
    for (int64_t n = 0; n < N; ++n) row[n] = row[n] * scale * sv[n] + bias[n];
  else
    for (int64_t n = 0; n < N; ++n) row[n] = row[n] * scale * sv[n];
}

}  // namespace cpu
}  // namespace pyquant
