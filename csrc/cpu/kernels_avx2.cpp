// AVX2 + FMA kernels (Haswell and later, Zen). Same plane layout and same exact integers as the
// AVX-512 GEMV; without VNNI the u8 x s8 products go through vpmaddubsw (pairs into int16:
// at most 2 * 3 * 128, no saturation), the four planes of up to 8 half groups are summed in int16
// (at most 8 * 3072, kWidenHalves) and vpmaddwd widens them to int32, scaling the hi sums by 256.
// Used for every batch size: token blocks of up to 4 reuse each unpacked group of codes.
// Mode "lut" has its own GEMV here (lut_block), which takes the products from vpshufb table
// lookups instead of the byte multiplier, and the tables' builder (kernel_api.h).
#include <immintrin.h>

#include <cstring>

#include "kernel_api.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace pyquant {
namespace cpu {
namespace {

// The 32 code bytes of a row from `src` when only `valid` (1..32) of them are the row's: a partial
// last group. AVX2 has no masked byte load, so the load reads the bytes after them (the next row's)
// and zeroes them, unless that would read past the codes tensor (its last row): those are copied.
// (A byte-wise copy per row, as group_codes made until session 17, cost more than the kernel on
// MiniLM's 384-wide rows: the vector load after 32 byte stores waits for all of them to retire.)
inline __m256i load_partial(const uint8_t* src, int64_t valid, const uint8_t* codes_end) {
  alignas(32) static const uint8_t kKeep[64] = {
      255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
      255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255};
  if (src + 32 <= codes_end) {
    const __m256i keep = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kKeep + 32 - valid));
    return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), keep);
  }
  alignas(32) uint8_t tmp[32] = {};
  std::memcpy(tmp, src, valid);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}

// Half groups (32 code bytes) whose u8 x s8 pair sums the kernel adds up in int16 before widening
// them: per lane at most 4 planes x 2 x 3 x 128 = 3072 a half, so 8 halves stay below 2^15. Both
// are multiplies, issued on the same port(s), which bound this kernel: widening every half took 2
// vpmaddwd per 8 vpmaddubsw, every 8th takes 2 per 64. (The harness's extremes check fails at 16.)
constexpr int kWidenHalves = 8;

// Codes are prefetched into L2 this many bytes ahead of each row's loads (prefetcht1, once per
// 64-byte line), as in the other GEMVs: the hardware prefetchers alone left the loop waiting on
// memory (kernel_bench, Zen 4, one token, one thread: 4096 x 11008 1.90-2.06 -> 0.95-1.13 ms,
// 11008 x 4096 1.71-1.73 -> 0.98-0.99; 2 KB ahead gained a fifth as much on the latter, 8 KB no more).
constexpr int64_t kIntPrefetchBytes = 4096;

template <int R, int MT>
void int_plane_block(const IntArgs& a, int64_t n, int64_t m0) {
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i x256 = _mm256_set1_epi16(256);
  const uint8_t* codes_end = a.codes + a.N * a.K4;
  const int8_t* acts[MT];
  for (int t = 0; t < MT; ++t) acts[t] = a.act + (m0 + t) * a.act_stride;
  // the halves of the row that hold code bytes (the rest of a partial last group multiplies zeros)
  const int64_t halves = (a.K4 + 31) / 32;
  int64_t total[R][MT] = {};
  for (int64_t h0 = 0; h0 < halves; h0 += 2 * kBlockGroups) {
    const int64_t h1 = imin(halves, h0 + 2 * kBlockGroups);
    __m256i acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_si256();
    for (int64_t w0 = h0; w0 < h1; w0 += kWidenHalves) {
      __m256i sh[R][MT], sl[R][MT];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t) sh[r][t] = sl[r][t] = _mm256_setzero_si256();
      for (int64_t h = w0; h < imin(h1, w0 + kWidenHalves); ++h) {
        const int64_t valid = a.K4 - 32 * h;  // code bytes of this half that are the row's
        __m256i z[R][4];
        for (int r = 0; r < R; ++r) {
          const uint8_t* src = a.codes + (n + r) * a.K4 + 32 * h;
          if (h % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(src + kIntPrefetchBytes), _MM_HINT_T1);
          const __m256i c = valid >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                                        : load_partial(src, valid, codes_end);
          z[r][0] = _mm256_and_si256(_mm256_srli_epi16(c, 6), three);
          z[r][1] = _mm256_and_si256(_mm256_srli_epi16(c, 4), three);
          z[r][2] = _mm256_and_si256(_mm256_srli_epi16(c, 2), three);
          z[r][3] = _mm256_and_si256(c, three);
        }
        // half h of group h / 2: planes at 64-byte strides, hi planes then lo planes
        const int64_t off = (h / 2) * 512 + (h % 2) * 32;
        for (int t = 0; t < MT; ++t) {
          const int8_t* ap = acts[t] + off;
          for (int i = 0; i < 4; ++i) {
            const __m256i ah = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + 64 * i));
            const __m256i al = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + 256 + 64 * i));
            for (int r = 0; r < R; ++r) {
              sh[r][t] = _mm256_add_epi16(sh[r][t], _mm256_maddubs_epi16(z[r][i], ah));
              sl[r][t] = _mm256_add_epi16(sl[r][t], _mm256_maddubs_epi16(z[r][i], al));
            }
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < MT; ++t)
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_add_epi32(_mm256_madd_epi16(sh[r][t], x256),
                                                                   _mm256_madd_epi16(sl[r][t], ones)));
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < MT; ++t) {
        // 8 int32 lanes -> one sum (the bound of kBlockGroups holds for the total).
        const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc[r][t]), _mm256_extracti128_si256(acc[r][t], 1));
        const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        const __m128i s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1));
        total[r][t] += _mm_cvtsi128_si32(s1);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < MT; ++t) a.store(m0 + t, n + r, total[r][t]);
}

template <int R, int MT>
void int_plane_rows(const IntArgs& a, int64_t n0, int64_t n1, int64_t m0) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) int_plane_block<R, MT>(a, n, m0);
  for (; n < n1; ++n) int_plane_block<1, MT>(a, n, m0);
}


// LUT GEMV (kernel_api.h's table-lookup kernels) on one full block of kLutRows rows, MT tokens.
// Per code byte j the block's 32 bytes are two index vectors (their low and high nibbles: a row's
// two planes side by side, rows 0-7 | 16-23 and 8-15 | 24-31), and per token vpshufb looks up the
// low and the high bytes of the entries; vpmaddubsw by [1, 2] folds plane 0 + 2 x plane 1 of a
// row into int16, low bytes (unsigned, at most 765) and high bytes (signed, |.| <= 384) apart, 32
// code bytes at most (24480 < 2^15), after which vpmaddwd by [1, 256] widens them to int32.
// Per 128 products and token: 4 shuffles, 4 byte multiplies, 4 adds, against 8 byte multiplies
// and 8 adds for the int GEMV.
constexpr int64_t kLutWiden = 32;
// acc += x (int16 lanes) in place: GCC 12 gives the intrinsic's result a register of its own and
// copies it back into the loop-carried sum (one move per add).
inline void add_epi16_in_place(__m256i& acc, __m256i x) { asm("vpaddw %1, %0, %0" : "+x"(acc) : "x"(x)); }
// int32 sums fold into int64 every this many code bytes: |sum| per code byte <= 3 * 4 * 8128.
constexpr int64_t kLutFold = 16384;

template <int MT>
void lut_block(const IntArgs& a, int64_t nb, int64_t m0) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i planes = _mm256_set1_epi16(0x0201);      // bytes [1, 2]: plane 0 + 2 x plane 1
  const __m256i hi_lo = _mm256_set1_epi32(0x01000001);   // int16 [1, 256]: low + 256 x high
  const uint8_t* codes = a.codes + nb * kLutRows * a.K4;
  const uint8_t* tables[MT];
  for (int t = 0; t < MT; ++t) tables[t] = reinterpret_cast<const uint8_t*>(a.act + (m0 + t) * a.act_stride);
  int64_t total[MT][kLutRows] = {};
  for (int64_t f0 = 0; f0 < a.K4; f0 += kLutFold) {
    const int64_t f1 = imin(a.K4, f0 + kLutFold);
    __m256i acc[MT][4];
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_setzero_si256();
    for (int64_t j0 = f0; j0 < f1; j0 += kLutWiden) {
      const int64_t j1 = imin(f1, j0 + kLutWiden);
      __m256i sl[MT][2], sh[MT][2];
      for (int t = 0; t < MT; ++t) sl[t][0] = sl[t][1] = sh[t][0] = sh[t][1] = _mm256_setzero_si256();
      for (int64_t j = j0; j < j1; ++j) {
        // (the layout keeps the two vectors' nibbles interleaved, not a row's planes: unpacking
        // those cost 7-12 % of the kernel alone, 1-29 tokens)
        if (j % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + kLutRows * j + kLutPrefetchBytes), _MM_HINT_T1);
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + kLutRows * j));
        const __m256i ia = _mm256_and_si256(c, low4), ib = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
        for (int t = 0; t < MT; ++t) {
          const uint8_t* tb = tables[t] + kLutTableBytes * j;
          const __m256i tl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb)));
          const __m256i th = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tb + 16)));
          add_epi16_in_place(sl[t][0], _mm256_maddubs_epi16(_mm256_shuffle_epi8(tl, ia), planes));
          add_epi16_in_place(sh[t][0], _mm256_maddubs_epi16(planes, _mm256_shuffle_epi8(th, ia)));
          add_epi16_in_place(sl[t][1], _mm256_maddubs_epi16(_mm256_shuffle_epi8(tl, ib), planes));
          add_epi16_in_place(sh[t][1], _mm256_maddubs_epi16(planes, _mm256_shuffle_epi8(th, ib)));
        }
      }
      for (int t = 0; t < MT; ++t)
        for (int i = 0; i < 2; ++i) {
          acc[t][2 * i] = _mm256_add_epi32(acc[t][2 * i], _mm256_madd_epi16(_mm256_unpacklo_epi16(sl[t][i], sh[t][i]), hi_lo));
          acc[t][2 * i + 1] =
              _mm256_add_epi32(acc[t][2 * i + 1], _mm256_madd_epi16(_mm256_unpackhi_epi16(sl[t][i], sh[t][i]), hi_lo));
        }
    }
    // acc[.][i] holds rows 4i .. 4i+3 in its low half and 16+4i .. 16+4i+3 in its high half
    if (a.out32 && f1 - f0 == a.K4) {  // one fold (K4 <= kLutFold): the int32 sums are the totals
      for (int t = 0; t < MT; ++t) {
        __m256i* out = reinterpret_cast<__m256i*>(a.out32 + (m0 + t) * a.N + nb * kLutRows);
        for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h+7, then 16+8h .. 16+8h+7
          const __m256i lo = acc[t][2 * h], hi = acc[t][2 * h + 1];
          _mm256_storeu_si256(out + h, _mm256_slli_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), 2));
          _mm256_storeu_si256(out + 2 + h, _mm256_slli_epi32(_mm256_permute2x128_si256(lo, hi, 0x31), 2));
        }
      }
      return;
    }
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < 4; ++i) {
        alignas(32) int32_t v[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), acc[t][i]);
        for (int r = 0; r < 4; ++r) {
          total[t][4 * i + r] += v[r];
          total[t][16 + 4 * i + r] += v[4 + r];
        }
      }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < kLutRows; ++r) a.store(m0 + t, nb * kLutRows + r, 4 * total[t][r]);
}

template <int MT>
void float_plane_row(const FloatArgs& a, int64_t n, int64_t m0) {
  const __m256 lut = _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3);  // vpermps reads the low 3 index bits
  alignas(32) uint8_t tmp[kGroupCodes];
  const uint8_t* row = a.codes + n * a.K4;
  const float* acts[MT];
  for (int t = 0; t < MT; ++t) acts[t] = a.act + (m0 + t) * a.G * kGroupElems;
  __m256 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* src = group_codes(row, a.K4, g, tmp);
    for (int q = 0; q < 8; ++q) {
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * q)));
      const __m256 z0 = _mm256_permutevar8x32_ps(lut, _mm256_srli_epi32(c, 6));
      const __m256 z1 = _mm256_permutevar8x32_ps(lut, _mm256_srli_epi32(c, 4));
      const __m256 z2 = _mm256_permutevar8x32_ps(lut, _mm256_srli_epi32(c, 2));
      const __m256 z3 = _mm256_permutevar8x32_ps(lut, c);
      const int64_t off = g * kGroupElems + 8 * q;
      for (int t = 0; t < MT; ++t) {
        const float* p = acts[t] + off;
        acc[t][0] = _mm256_fmadd_ps(z0, _mm256_loadu_ps(p), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(z1, _mm256_loadu_ps(p + 64), acc[t][1]);
        acc[t][0] = _mm256_fmadd_ps(z2, _mm256_loadu_ps(p + 128), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(z3, _mm256_loadu_ps(p + 192), acc[t][1]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    const __m256 s = _mm256_add_ps(acc[t][0], acc[t][1]);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
    a.out[(m0 + t) * a.N + n] = _mm_cvtss_f32(s4);
  }
}

}  // namespace

void int_plane_avx2(const IntArgs& a, int64_t n0, int64_t n1) {
  for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
    const int64_t t1 = imin(n1, t0 + kRowTile);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      switch (imin(4, a.M - m0)) {
        // (one token: 2 rows per activation load; 4 spilled their int16 sums and levels to the stack,
        // 16 of the 16 registers: 25-30 % slower, codes in cache, AVX2 EPYC)
        case 1: int_plane_rows<2, 1>(a, t0, t1, m0); break;
        case 2: int_plane_rows<2, 2>(a, t0, t1, m0); break;
        case 3: int_plane_rows<1, 3>(a, t0, t1, m0); break;
        default: int_plane_rows<1, 4>(a, t0, t1, m0); break;
      }
    }
  }
}

void lut_gemv_avx2(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t full = a.N / kLutRows * kLutRows;  // rows in full blocks; the rest: the portable kernel
  for (int64_t nb = n0 / kLutRows; nb < imin(n1, full) / kLutRows; ++nb) {
    int64_t m0 = 0;
    for (; m0 + 2 <= a.M; m0 += 2) lut_block<2>(a, nb, m0);
    if (m0 < a.M) lut_block<1>(a, nb, m0);
  }
  if (n1 > full) lut_gemv_scalar(a, full > n0 ? full : n0, n1);
}

void lut_tables_avx2(const int8_t* act, int64_t K4, uint8_t* tables) {
  // mask[i] lane s: all ones where bit i of s is set
  const __m256i bits = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m256i mask[4];
  for (int i = 0; i < 4; ++i) {
    const __m256i bit = _mm256_set1_epi16(static_cast<int16_t>(1 << i));
    mask[i] = _mm256_cmpeq_epi16(_mm256_and_si256(bits, bit), bit);
  }
  // per 128-bit lane: the low bytes of its 8 entries, then their high bytes; then the lanes' halves
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i one = _mm256_set1_epi16(1);
  for (int64_t j0 = 0; j0 < K4; j0 += 16) {
    // q14 of the 4 activations of code bytes j0 .. j0+15 (the plane layout is zero-padded to
    // whole groups of 64, so these reads stay inside it)
    alignas(32) int16_t q14[4][16];
    const int8_t* ah = act + (j0 / kGroupCodes) * 512 + j0 % kGroupCodes;
    for (int i = 0; i < 4; ++i) {
      const __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ah + 64 * i)));
      const __m256i l = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ah + 256 + 64 * i)));
      const __m256i q = _mm256_add_epi16(_mm256_slli_epi16(h, 8), l);
      const __m256i even = _mm256_and_si256(_mm256_srai_epi16(q, 2), one);  // lut_q14: ties to even
      _mm256_store_si256(reinterpret_cast<__m256i*>(q14[i]),
                         _mm256_srai_epi16(_mm256_add_epi16(q, _mm256_add_epi16(one, even)), 2));
    }
    for (int64_t j = j0; j < imin(K4, j0 + 16); ++j) {
      __m256i e = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i)
        e = _mm256_add_epi16(e, _mm256_and_si256(_mm256_set1_epi16(q14[i][j - j0]), mask[i]));
      e = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(e, split), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tables + kLutTableBytes * j), e);
    }
  }
}

void float_plane_avx2(const FloatArgs& a, int64_t n0, int64_t n1) {
  for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
    const int64_t t1 = imin(n1, t0 + kRowTile);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int64_t mt = imin(4, a.M - m0);
      for (int64_t n = t0; n < t1; ++n) {
        switch (mt) {
          case 1: float_plane_row<1>(a, n, m0); break;
          case 2: float_plane_row<2>(a, n, m0); break;
          case 3: float_plane_row<3>(a, n, m0); break;
          default: float_plane_row<4>(a, n, m0); break;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyquant

#pragma GCC pop_options
