// Shared by the AVX-512 kernel files (kernels_avx512.cpp, kernels_amx.cpp, kernels_lut3_avx512.cpp).
// Include it after the file's `#pragma GCC target(...)`: it is compiled for that target. `static`:
// every file keeps its own copy, so the linker can never hand an AVX-512 body to code built for
// another target.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernel_api.h"

namespace pyquant {
namespace cpu {

// Makes v a register of its own: gcc otherwise may fold the load that made v into every
// instruction that uses v (a memory operand each, so that many loads), where the load port is what
// the loop waits on. (PYQUANT_NO_INLINE_ASM: the harness's emulated build, check_portable.sh)
static inline void keep_in_register(__m512i& v) {
#if !defined(PYQUANT_NO_INLINE_ASM)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// acc += u8 z x s8 a, acc += a x b (int16 pairs) and acc += x (int16 lanes), in place. GCC 12
// gives the intrinsics' results registers of their own and copies them back into the loop-carried
// accumulators (one or two moves per instruction). (PYQUANT_NO_INLINE_ASM: the harness's emulated
// build, check_portable.sh)
static inline void dpbusd_in_place(__m512i& acc, __m512i z, __m512i a) {
#if defined(PYQUANT_NO_INLINE_ASM)
  acc = _mm512_dpbusd_epi32(acc, z, a);
#else
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(z), "v"(a));
#endif
}
static inline void add_epi16_in_place(__m512i& acc, __m512i x) {
#if defined(PYQUANT_NO_INLINE_ASM)
  acc = _mm512_add_epi16(acc, x);
#else
  asm("vpaddw %1, %0, %0" : "+v"(acc) : "v"(x));
#endif
}
static inline void dpwssd_in_place(__m512i& acc, __m512i a, __m512i b) {
#if defined(PYQUANT_NO_INLINE_ASM)
  acc = _mm512_dpwssd_epi32(acc, a, b);
#else
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
#endif
}

// kernel_api.h's lut3_q on 32 int16 lanes (|q| <= kQMax): |q| / 18 rounded, the sign put back
// (floor((m + 9) / 18) = ((m + 9) * 58255) >> 20, exact for m <= 32512).
static inline __m512i lut3_q_epi16(__m512i q) {
  const __m512i m = _mm512_srli_epi16(
      _mm512_mulhi_epu16(_mm512_add_epi16(_mm512_abs_epi16(q), _mm512_set1_epi16(9)),
                         _mm512_set1_epi16(static_cast<int16_t>(58255))),
      4);
  return _mm512_mask_sub_epi16(m, _mm512_cmplt_epi16_mask(q, _mm512_setzero_si512()), _mm512_setzero_si512(), m);
}

// The sum of the 16 int32 lanes of v, in int64 (lanes near the int32 limits would overflow it).
static inline int64_t sum_epi32_i64(__m512i v) {
  return _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v))) +
         _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

// Valid code bytes of group g (the last group of a row may be partial; masked-off bytes load
// as code 0, level 0, and meet zero-padded activations anyway).
static inline __mmask64 group_mask(int64_t K4, int64_t g) {
  const int64_t left = K4 - g * kGroupCodes;
  return left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
}

// In-register transpose of a 16 x 16 dword matrix (v[r] lane c -> v[c] lane r).
static inline void transpose16(__m512i (&v)[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + q], 128-bit lane L: rows 4k..4k+3 of column 4L + q
    u[4 * k + 0] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // a 4 x 4 transpose of 128-bit lanes
    const __m512i a = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x44);
    const __m512i b = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x44);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xEE);
    v[q] = _mm512_shuffle_i32x4(a, c, 0x88);
    v[4 + q] = _mm512_shuffle_i32x4(a, c, 0xDD);
    v[8 + q] = _mm512_shuffle_i32x4(b, d, 0x88);
    v[12 + q] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

}  // namespace cpu
}  // namespace pyquant
