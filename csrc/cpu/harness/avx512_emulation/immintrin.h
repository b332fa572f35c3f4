// AVX-512 intrinsics on any x86-64 CPU, for the kernel harness only (scripts/check_portable.sh
// builds the AVX-512 kernel files against this header instead of the compiler's): SIMDe's
// portable versions (libsimde-dev), plus those SIMDe 0.7.4 (Debian 12) lacks or gets wrong,
// written out lane by lane from Intel's definitions. Never part of the extension.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>

#include <cmath>
#include <cstdint>
#include <cstring>

typedef simde__mmask8 __mmask8;
typedef simde__mmask16 __mmask16;
typedef simde__mmask32 __mmask32;
typedef simde__mmask64 __mmask64;
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC 0x08
#endif

namespace pyquant_emu {
// Lanes of type T of any vector V, and back
template <typename T, typename V, int N = sizeof(V) / sizeof(T)>
struct Lanes {
  T v[N];
  static Lanes of(const V& x) { Lanes l; std::memcpy(l.v, &x, sizeof(V)); return l; }
};
template <typename V, typename T, int N>
inline V pack(const T (&v)[N]) { static_assert(sizeof(V) == sizeof(T) * N, "size"); V x; std::memcpy(&x, v, sizeof(V)); return x; }

template <typename V, typename T, int N = sizeof(V) / sizeof(T)>
inline V maskz_load(uint64_t k, const void* p) {
  T out[N];
  for (int i = 0; i < N; ++i) out[i] = (k >> i) & 1 ? static_cast<const T*>(p)[i] : T(0);
  return pack<V>(out);
}
template <typename T, typename V, int N = sizeof(V) / sizeof(T)>
inline void mask_store(void* p, uint64_t k, const V& x) {
  const auto l = Lanes<T, V>::of(x);
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1) static_cast<T*>(p)[i] = l.v[i];
}
template <typename To, typename VTo, typename From, typename VFrom, int N = sizeof(VTo) / sizeof(To)>
inline VTo convert(const VFrom& x) {  // lane i of x as To (integers: truncated; floats: C++ conversion)
  const auto l = Lanes<From, VFrom>::of(x);
  To out[N];
  for (int i = 0; i < N; ++i) out[i] = static_cast<To>(l.v[i]);
  return pack<VTo>(out);
}
inline __m512 join(__m256 lo, __m256 hi) {
  float v[16];
  std::memcpy(v, &lo, 32);
  std::memcpy(v + 8, &hi, 32);
  return pack<__m512>(v);
}
}  // namespace pyquant_emu

inline __m128i _mm_maskz_loadu_epi8(__mmask16 k, const void* p) { return pyquant_emu::maskz_load<__m128i, int8_t>(k, p); }
inline __m512i _mm512_maskz_loadu_epi8(__mmask64 k, const void* p) { return pyquant_emu::maskz_load<__m512i, int8_t>(k, p); }
inline __m256i _mm256_maskz_loadu_epi16(__mmask16 k, const void* p) { return pyquant_emu::maskz_load<__m256i, int16_t>(k, p); }
inline __m512i _mm512_maskz_loadu_epi32(__mmask16 k, const void* p) { return pyquant_emu::maskz_load<__m512i, int32_t>(k, p); }
inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) { return pyquant_emu::maskz_load<__m512, float>(k, p); }
inline void _mm256_mask_storeu_epi16(void* p, __mmask16 k, __m256i x) { pyquant_emu::mask_store<int16_t>(p, k, x); }
inline void _mm512_mask_storeu_epi32(void* p, __mmask16 k, __m512i x) { pyquant_emu::mask_store<int32_t>(p, k, x); }
inline void _mm512_mask_storeu_epi64(void* p, __mmask8 k, __m512i x) { pyquant_emu::mask_store<int64_t>(p, k, x); }
inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 x) { pyquant_emu::mask_store<float>(p, k, x); }

inline __m512i _mm512_cvtepi32_epi64(__m256i x) { return pyquant_emu::convert<int64_t, __m512i, int32_t, __m256i>(x); }
inline __m512i _mm512_cvtepu8_epi32(__m128i x) { return pyquant_emu::convert<int32_t, __m512i, uint8_t, __m128i>(x); }
inline __m512i _mm512_cvtepu16_epi32(__m256i x) { return pyquant_emu::convert<int32_t, __m512i, uint16_t, __m256i>(x); }
inline __m256i _mm512_cvtepi32_epi16(__m512i x) { return pyquant_emu::convert<int16_t, __m256i, int32_t, __m512i>(x); }
inline __m128i _mm512_cvtepi32_epi8(__m512i x) { return pyquant_emu::convert<int8_t, __m128i, int32_t, __m512i>(x); }
inline __m512 _mm512_cvtepi32_ps(__m512i x) { return pyquant_emu::convert<float, __m512, int32_t, __m512i>(x); }
inline __m512d _mm512_cvtps_pd(__m256 x) { return pyquant_emu::convert<double, __m512d, float, __m256>(x); }
inline __m512i _mm512_cvtps_epi32(__m512 x) {  // round to nearest even; NaN and out of range: INT32_MIN
  const auto l = pyquant_emu::Lanes<float, __m512>::of(x);
  int32_t out[16];
  for (int i = 0; i < 16; ++i) {
    const float r = std::nearbyint(l.v[i]);
    out[i] = (r >= -2147483648.0f && r < 2147483648.0f) ? static_cast<int32_t>(r) : INT32_MIN;
  }
  return pyquant_emu::pack<__m512i>(out);
}
inline __m512 _mm512_cvtph_ps(__m256i x) {  // exact; a NaN keeps its payload and comes out quiet
  const auto l = pyquant_emu::Lanes<uint16_t, __m256i>::of(x);
  uint32_t out[16];
  for (int i = 0; i < 16; ++i) {
    const uint32_t h = l.v[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 0x3FF;
    if (e == 31) {
      out[i] = sign | 0x7F800000u | (m << 13) | (m ? 0x00400000u : 0);
    } else if (e) {
      out[i] = sign | ((e + 112) << 23) | (m << 13);
    } else {  // zero or subnormal: m * 2^-24, exact in float
      const float f = static_cast<float>(m) * 0x1p-24f;
      std::memcpy(&out[i], &f, 4);
      out[i] |= sign;
    }
  }
  return pyquant_emu::pack<__m512>(out);
}
inline __m256i _mm512_cvtps_ph(__m512 x, int rounding) {
  return _mm256_set_m128i(_mm256_cvtps_ph(_mm256_set_m128(_mm512_extractf32x4_ps(x, 3), _mm512_extractf32x4_ps(x, 2)), rounding),
                          _mm256_cvtps_ph(_mm512_castps512_ps256(x), rounding));
}
inline __m512i _mm512_srai_epi32(__m512i x, int imm) {
  auto l = pyquant_emu::Lanes<int32_t, __m512i>::of(x);
  for (auto& v : l.v) v >>= imm > 31 ? 31 : imm;
  return pyquant_emu::pack<__m512i>(l.v);
}
inline __m512 _mm512_permute_ps(__m512 x, int imm) {  // within each 128-bit lane
  const auto l = pyquant_emu::Lanes<float, __m512>::of(x);
  float out[16];
  for (int i = 0; i < 16; ++i) out[i] = l.v[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
  return pyquant_emu::pack<__m512>(out);
}
inline __m512 _mm512_shuffle_f32x4(__m512 a, __m512 b, int imm) {  // 128-bit lanes: 0-1 from a, 2-3 from b
  const auto la = pyquant_emu::Lanes<float, __m512>::of(a), lb = pyquant_emu::Lanes<float, __m512>::of(b);
  float out[16];
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < 4; ++i) out[4 * q + i] = (q < 2 ? la : lb).v[4 * ((imm >> (2 * q)) & 3) + i];
  return pyquant_emu::pack<__m512>(out);
}
// the reductions in the order GCC's avx512fintrin.h adds: 256-bit halves, 128-bit halves, pairs
inline float _mm512_reduce_add_ps(__m512 x) {
  const auto l = pyquant_emu::Lanes<float, __m512>::of(x);
  float h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = l.v[8 + i] + l.v[i];
  for (int i = 0; i < 4; ++i) q[i] = h[4 + i] + h[i];
  const float p0 = q[0] + q[2], p1 = q[1] + q[3];
  return p0 + p1;
}
inline float _mm512_reduce_max_ps(__m512 x) {  // (vmaxps: the second operand where either is NaN)
  const auto l = pyquant_emu::Lanes<float, __m512>::of(x);
  auto max = [](float a, float b) { return a > b ? a : b; };
  float h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = max(l.v[8 + i], l.v[i]);
  for (int i = 0; i < 4; ++i) q[i] = max(h[4 + i], h[i]);
  const float p[4] = {max(q[0], q[2]), max(q[1], q[3]), max(q[2], q[0]), max(q[3], q[1])};
  const float r[2] = {max(p[0], p[1]), max(p[1], p[0])};
  return r[0];
}
#undef _mm512_madd_epi16  // (SIMDe 0.7.4's alias takes the masked form's four arguments)
inline __m512i _mm512_madd_epi16(__m512i a, __m512i b) {
  const auto la = pyquant_emu::Lanes<int16_t, __m512i>::of(a), lb = pyquant_emu::Lanes<int16_t, __m512i>::of(b);
  int32_t out[16];
  for (int i = 0; i < 16; ++i) out[i] = int32_t(la.v[2 * i]) * lb.v[2 * i] + int32_t(la.v[2 * i + 1]) * lb.v[2 * i + 1];
  return pyquant_emu::pack<__m512i>(out);
}
// (mode lut3's kernel file: VBMI2's vpshrdw and the 16-bit forms SIMDe 0.7.4 lacks)
inline __m512i _mm512_shrdi_epi16(__m512i a, __m512i b, int imm) {  // lane i: low 16 bits of (b:a) >> imm
  const auto la = pyquant_emu::Lanes<uint16_t, __m512i>::of(a), lb = pyquant_emu::Lanes<uint16_t, __m512i>::of(b);
  uint16_t out[32];
  for (int i = 0; i < 32; ++i) out[i] = static_cast<uint16_t>(((uint32_t(lb.v[i]) << 16) | la.v[i]) >> (imm & 15));
  return pyquant_emu::pack<__m512i>(out);
}
inline __m512i _mm512_mulhi_epu16(__m512i a, __m512i b) {
  const auto la = pyquant_emu::Lanes<uint16_t, __m512i>::of(a), lb = pyquant_emu::Lanes<uint16_t, __m512i>::of(b);
  uint16_t out[32];
  for (int i = 0; i < 32; ++i) out[i] = static_cast<uint16_t>((uint32_t(la.v[i]) * lb.v[i]) >> 16);
  return pyquant_emu::pack<__m512i>(out);
}
inline __m512i _mm512_mask_sub_epi16(__m512i src, __mmask32 k, __m512i a, __m512i b) {
  const auto ls = pyquant_emu::Lanes<uint16_t, __m512i>::of(src), la = pyquant_emu::Lanes<uint16_t, __m512i>::of(a),
             lb = pyquant_emu::Lanes<uint16_t, __m512i>::of(b);
  uint16_t out[32];
  for (int i = 0; i < 32; ++i) out[i] = (k >> i) & 1 ? static_cast<uint16_t>(la.v[i] - lb.v[i]) : ls.v[i];
  return pyquant_emu::pack<__m512i>(out);
}
inline __mmask32 _mm512_cmplt_epi16_mask(__m512i a, __m512i b) {
  const auto la = pyquant_emu::Lanes<int16_t, __m512i>::of(a), lb = pyquant_emu::Lanes<int16_t, __m512i>::of(b);
  __mmask32 k = 0;
  for (int i = 0; i < 32; ++i) k |= __mmask32(la.v[i] < lb.v[i]) << i;
  return k;
}
inline void _mm512_mask_storeu_epi16(void* p, __mmask32 k, __m512i x) { pyquant_emu::mask_store<int16_t>(p, k, x); }
inline int64_t _mm512_reduce_add_epi64(__m512i x) {
  const auto l = pyquant_emu::Lanes<int64_t, __m512i>::of(x);
  int64_t s = 0;
  for (auto v : l.v) s += v;
  return s;
}
