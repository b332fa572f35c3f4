// AVX-512 kernels (F, BW, VL, DQ and VNNI: Ice Lake, Sapphire Rapids, Zen 4 and later).
// Only called after the driver has checked the CPU (see qlinear.cpp); compiled for that ISA
// with a target pragma because setup.py builds every file with the same portable flags.
//
// GEMV (int mode, 1-32 tokens, plane layout): a 64-byte load of codes holds 256 weights; masking
// gives four 64-byte planes of 2-bit levels, each lined up with 64 activations, and vpdpbusd
// multiplies them as u8 x s8 with no further unpacking. 2 rows share each activation load,
// tokens go 2 at a time (one at a time past K = 9216, kPairActBytes), codes are prefetched into
// L2 ahead, and the 16 int32 lanes are summed once per 32 groups (up to K = 2048 once per row,
// 16 rows in one transposing reduction). At one token it takes 0.9-1.1x the time a plain read of
// the same codes takes on two Zen 4 threads, 1.3-1.4x on one (kernel_bench mode read).
//
// GEMM (int mode, more tokens, natural layout): a tile of 32 rows is unpacked for all of K into
// dwords holding the 4 levels of one code (lanes = rows) and reused by a block of tokens: each
// vpdpbusd multiplies 16 rows by one broadcast 4-byte chunk of activations, so accumulator lanes
// are output rows, no horizontal sums are needed, and each output is stored once. Compute bound:
// two vpdpbusd (hi, lo) per 64 multiply-adds.
//
// Mode "lut" (lut_block): the AVX2 table-lookup GEMV on 64-byte vectors, two code bytes per lookup.
#include <immintrin.h>

#include "kernel_api.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

#include "avx512_common.h"

namespace pyquant {
namespace cpu {
namespace {

// ------------------------------------------------------------------ int GEMV, plane layout

// Per 128-bit lane L: lane L's part of the sums of a, b, c and d (int32 0-3), from pairwise unpacks.
inline __m512i lane_sums4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

// The sums of the 16 int32 lanes of a, b, c and d, as 4 int32.
inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i abcd = lane_sums4(a, b, c, d);
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// The levels of a code byte c (level 0 in its top two bits) are multiplied where they sit, each
// scaled by a power of two that a shift divides out of the sums exactly:
//  - kClasses = 4 (one token): level i is c & (0xC0 >> 2i), times 4^(3-i); one instruction per
//    level, one accumulator per level;
//  - kClasses = 2 (two tokens): levels 0 and 1 are (c >> 2) & 0x30 and c & 0x30 (times 16),
//    levels 2 and 3 (c >> 2) & 3 and c & 3; one instruction more per group, but half the
//    accumulators, so that 2 rows x 2 tokens fit the 32 registers.
// Per lane and group a sum is at most 4 * 192 * 128 < 2^17 (before the division), times
// kBlockGroups = 32: no int32 overflow.
template <int kClasses>
inline __m512i unscale(const __m512i (&acc)[kClasses]) {
  if constexpr (kClasses == 4)
    return _mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32(acc[0], 6), _mm512_srai_epi32(acc[1], 4)),
                            _mm512_add_epi32(_mm512_srai_epi32(acc[2], 2), acc[3]));
  else
    return _mm512_add_epi32(_mm512_srai_epi32(acc[0], 4), acc[1]);
}

// 256 hi + lo of P rows x T tokens over groups [g0, g1): out[r * T + t], 16 int32 lanes each.
// Each row's codes are prefetched pf bytes ahead. The rows share every activation load and the
// tokens every code load: the loads, not the multiplies, bound this loop (a standalone copy, one
// token, codes in L1: 2.65 ns per 64 code bytes with one row at K = 4096, 2.2 with two; 4.1 vs
// 2.5 at K = 32768, where the activations outgrow L1). Named accumulators and an unmasked loop
// over the whole groups: with arrays indexed in an unrolled loop and the tail mask computed every
// group, GCC copied all the accumulators twice per group.
template <int P, int T>
inline void row_sums(const uint8_t* const (&rows)[P], const int8_t* const (&acts)[T], int64_t K4, int64_t g0,
                     int64_t g1, int64_t pf, __m512i* out) {
  constexpr int C = T == 1 ? 4 : 2;  // level classes (above)
  static_assert(P * T * C * 2 <= 16, "accumulators: 16 of the 32 registers");
  const __m512i f0 = _mm512_set1_epi8(static_cast<char>(0xC0)), f1 = _mm512_set1_epi8(0x30);
  const __m512i f2 = _mm512_set1_epi8(0x0C), f3 = _mm512_set1_epi8(0x03);
  __m512i h[P][T][C], l[P][T][C];
  for (int r = 0; r < P; ++r)
    for (int t = 0; t < T; ++t)
      for (int k = 0; k < C; ++k) h[r][t][k] = l[r][t][k] = _mm512_setzero_si512();
  // (the accumulator indices are compile-time constants after unrolling: they stay in registers)
  const auto step = [&](const __m512i (&c)[P], int64_t g) __attribute__((always_inline)) {
    __m512i shifted[P];
    if constexpr (C == 2)
      for (int r = 0; r < P; ++r) shifted[r] = _mm512_srli_epi16(c[r], 2);  // (masks drop the bits from the next byte)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512i z[P];
#pragma GCC unroll 2
      for (int r = 0; r < P; ++r) {
        if constexpr (C == 4) z[r] = _mm512_and_si512(c[r], i == 0 ? f0 : i == 1 ? f1 : i == 2 ? f2 : f3);
        else z[r] = _mm512_and_si512(i % 2 == 0 ? shifted[r] : c[r], i < 2 ? f1 : f3);
      }
      const int k = C == 4 ? i : i / 2;
#pragma GCC unroll 2
      for (int t = 0; t < T; ++t) {
        const int8_t* ap = acts[t] + g * 512;
        const __m512i ah = _mm512_loadu_si512(ap + 64 * i), al = _mm512_loadu_si512(ap + 256 + 64 * i);
#pragma GCC unroll 2
        for (int r = 0; r < P; ++r) {
          dpbusd_in_place(h[r][t][k], z[r], ah);
          dpbusd_in_place(l[r][t][k], z[r], al);
        }
      }
    }
  };
  const int64_t whole = imin(g1, K4 / kGroupCodes);  // groups with all 64 code bytes
  int64_t g = g0;
  for (; g < whole; ++g) {
    __m512i c[P];
#pragma GCC unroll 2
    for (int r = 0; r < P; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + g * kGroupCodes + pf), _MM_HINT_T1);
      c[r] = _mm512_loadu_si512(rows[r] + g * kGroupCodes);
    }
    step(c, g);
  }
  if (g < g1) {
    __m512i c[P];
    for (int r = 0; r < P; ++r) c[r] = _mm512_maskz_loadu_epi8(group_mask(K4, g), rows[r] + g * kGroupCodes);
    step(c, g);
  }
  for (int r = 0; r < P; ++r)
    for (int t = 0; t < T; ++t)
      out[r * T + t] = _mm512_add_epi32(_mm512_slli_epi32(unscale<C>(h[r][t]), 8), unscale<C>(l[r][t]));
}

// P rows (any rows of the layer) x T tokens from m0, over all groups.
template <int P, int T>
void rows_tokens(const IntArgs& a, const int64_t (&n)[P], int64_t m0, int64_t pf) {
  const uint8_t* rows[P];
  for (int r = 0; r < P; ++r) rows[r] = a.codes + n[r] * a.K4;
  const int8_t* acts[T];
  for (int t = 0; t < T; ++t) acts[t] = a.act + (m0 + t) * a.act_stride;
  int64_t total[P * T] = {};
  for (int64_t g0 = 0; g0 < a.G; g0 += kBlockGroups) {
    __m512i v[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    row_sums<P, T>(rows, acts, a.K4, g0, imin(a.G, g0 + kBlockGroups), pf, v);
    alignas(16) int32_t s4[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(s4), reduce4(v[0], v[1], v[2], v[3]));
    for (int i = 0; i < P * T; ++i) total[i] += s4[i];
  }
  for (int r = 0; r < P; ++r)
    for (int t = 0; t < T; ++t) a.store(m0 + t, n[r], total[r * T + t]);
}

// The sums of the 16 int32 lanes of each of v[0..15], in order: lane_sums4 per four vectors, then
// the four lanes of the four results added crosswise. ~3 instructions per sum where reduce4 and a
// scalar store took ~12.
inline __m512i reduce16(const __m512i (&v)[16]) {
  __m512i q[4];  // q[g], 128-bit lane L: lane L's part of the sums of v[4g .. 4g+3]
  for (int g = 0; g < 4; ++g) q[g] = lane_sums4(v[4 * g], v[4 * g + 1], v[4 * g + 2], v[4 * g + 3]);
  // lanes [q0.0+q0.1, q0.2+q0.3, q1.0+q1.1, q1.2+q1.3], the same for q2, q3; then the halves
  const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[0], q[1], 0x88), _mm512_shuffle_i32x4(q[0], q[1], 0xDD));
  const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[2], q[3], 0x88), _mm512_shuffle_i32x4(q[2], q[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0x88), _mm512_shuffle_i32x4(s01, s23, 0xDD));
}

// rows_tokens for the 16 rows n .. n+15, as the pairs (n + i, n + 8 + i), on a layer of one
// block of groups (G <= kBlockGroups: no int64 folds) with int32 outputs: the 16 sums of each
// token come out of one reduce16 and one store. At K = 384, 1536 x 384, one token, one thread:
// the horizontal sums and stores had taken about half the time.
template <int T>
void rows16_tokens(const IntArgs& a, int64_t n, int64_t m0, int64_t pf) {
  const int8_t* acts[T];
  for (int t = 0; t < T; ++t) acts[t] = a.act + (m0 + t) * a.act_stride;
  __m512i v[T][16];
  for (int i = 0; i < 8; ++i) {
    const uint8_t* const rows[2] = {a.codes + (n + i) * a.K4, a.codes + (n + 8 + i) * a.K4};
    __m512i out[2 * T];
    row_sums<2, T>(rows, acts, a.K4, 0, a.G, pf, out);
    for (int t = 0; t < T; ++t) {
      v[t][i] = out[t];
      v[t][8 + i] = out[T + t];
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_si512(a.out32 + (m0 + t) * a.N + n, reduce16(v[t]));
}

// T tokens from m0 over rows [n0, n1), two rows at a time, in blocks of 2d rows: row i of the
// block is read with row d + i, so the codes are two streams in address order, each over d whole
// rows. With d rows >= 4 KB apart the streams are in different 4 KB pages, and the L2 hardware
// prefetcher (which follows one stream per page) sees each page read in order; two neighbouring
// rows read together interleave in one page and it fetches less ahead (4096 x 4096 from memory,
// 2 threads, one token: 0.22 -> 0.18 ms). Each stream prefetches one block (2d rows) ahead, so
// every line is requested once, into L2 (prefetcht1): prefetches into L1 wait for its few miss
// buffers, and on Zen 4 they left the loop waiting on memory almost as long as it computed
// (kernel_bench, 4096 x 4096, one token: 300 -> 185 us on one thread, 172 -> 119 us on two, where
// a plain read of the same rows takes 125; a prefetch distance of 4 blocks gained nothing).
template <int T>
void int_plane_rows(const IntArgs& a, int64_t n0, int64_t n1, int64_t m0) {
  const int64_t d = imin(8, (4096 + a.K4 - 1) / a.K4), pf = 2 * d * a.K4;
  int64_t n = n0;
  if (d == 8 && a.out32 && a.G <= kBlockGroups)  // K <= 2048
    for (; n + 16 <= n1; n += 16) rows16_tokens<T>(a, n, m0, pf);
  for (; n + 2 * d <= n1; n += 2 * d)
    for (int64_t i = 0; i < d; ++i) rows_tokens<2, T>(a, {n + i, n + d + i}, m0, pf);
  for (; n + 2 <= n1; n += 2) rows_tokens<2, T>(a, {n, n + 1}, m0, pf);
  if (n < n1) rows_tokens<1, T>(a, {n}, m0, pf);
}

// More than two tokens go two at a time over row sub-tiles small enough to stay in L1 between
// the passes (blocks of 3 or 4 tokens over 2 rows were measured 2x slower once the codes stream
// from memory: the activations of 4 tokens, 32 KB at K = 4096, crowd the codes out of L1).
constexpr int64_t kGemvSubTile = 16;
// Tokens go in pairs while both tokens' activations take at most 36 KB (K up to 9216; set as 3/4
// of a 48 KB L1 when this machine was taken for a Zen 5, but measured on it: its Zen 4 L1 holds
// 32 KB); past that they and the codes evict each other, and each token goes alone over the sub-tile,
// the second reading its codes from L2 (Zen 4, one thread, 11008 x 4096: 2 tokens 1.95 -> 1.17-1.44
// ms, 4 tokens 3.0 -> 2.2-2.5; at 8192 x 8192, 32 KB for the pair, alone was 5-25 % slower).
constexpr int64_t kPairActBytes = 36 << 10;

// ------------------------------------------------------------------ int GEMM, natural layout

constexpr int kMicroTokens = 6;                  // 6 tokens x 2 row halves x (hi, lo): 24 accumulators
constexpr int64_t kActBlockBytes = 1024 << 10;   // activations of one token block (128 tokens at K = 4096)

// Every dword lane holds one code byte c; returns the dword with bytes (z0, z1, z2, z3),
// z0 = c >> 6 in the lowest byte, so it pairs with activation 4j + 0 in vpdpbusd.
inline __m512i expand_code(__m512i d) {
  const __m512i t = _mm512_ternarylogic_epi32(_mm512_srli_epi32(d, 6), _mm512_slli_epi32(d, 4),
                                              _mm512_slli_epi32(d, 14), 0xFE);  // a | b | c
  return _mm512_ternarylogic_epi32(t, _mm512_slli_epi32(d, 24), _mm512_set1_epi32(0x03030303),
                                   0xA8);  // (a | b) & c
}

// buf[j][h][r] (dwords), j over all K4 chunks: the levels of code codes[16 h + r, j] for the
// `rows` valid rows of the tile starting at `codes`; missing rows are code 0 (level 0).
void unpack_tile(const uint8_t* codes, int64_t K4, int64_t rows, uint32_t* buf) {
  for (int h = 0; h < 2; ++h) {
    for (int64_t jb = 0; jb < K4; jb += 16) {
      const int64_t cnt = imin(16, K4 - jb);
      const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1);
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t row = h * 16 + r;
        const __m128i bytes = row < rows ? _mm_maskz_loadu_epi8(mask, codes + row * K4 + jb) : _mm_setzero_si128();
        v[r] = expand_code(_mm512_cvtepu8_epi32(bytes));
      }
      transpose16(v);
      for (int64_t j = 0; j < cnt; ++j) _mm512_store_si512(buf + ((jb + j) * 2 + h) * 16, v[j]);
    }
  }
}

// unpack_tile with AVX512-VBMI (Ice Lake, Zen 4 and later): about half the instructions. Per
// half tile, 16 rows x 16 code bytes sit in four registers (row r: register r / 4, lane r % 4);
// for chunk j two vpermi2b gather the bytes of rows 2k and 2k+1 into qword k, and vpmultishiftqb
// cuts each byte into its four 2-bit fields, z0 = c >> 6 first, one dword per row.
__attribute__((target("avx512vbmi"))) void unpack_tile_vbmi(const uint8_t* codes, int64_t K4, int64_t rows,
                                                            uint32_t* buf) {
  alignas(64) uint8_t idx0[64] = {};
  for (int k = 0; k < 8; ++k)
    for (int b = 0; b < 2; ++b) {
      const int r = (2 * k + b) & 7;  // rows 8-15 come from the second pair of registers
      idx0[8 * k + b] = static_cast<uint8_t>((r / 4) * 64 + (r % 4) * 16);
    }
  const __m512i base = _mm512_load_si512(idx0);
  const __m512i fields = _mm512_set1_epi64(0x08'0A'0C'0E'00'02'04'06LL);  // bit offsets 6,4,2,0,14,12,10,8
  const __m512i three = _mm512_set1_epi8(3);
  constexpr __mmask64 kUpperRows = 0xFFFFFFFF00000000ULL;  // qwords 4-7: rows 8-15
  for (int h = 0; h < 2; ++h) {
    for (int64_t jb = 0; jb < K4; jb += 16) {
      const int64_t cnt = imin(16, K4 - jb);
      const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1);
      __m512i z[4];
      for (int q = 0; q < 4; ++q) {
        z[q] = _mm512_setzero_si512();
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t row = h * 16 + 4 * q + lane;
          if (row < rows)
            z[q] = _mm512_inserti32x4(z[q], _mm_maskz_loadu_epi8(mask, codes + row * K4 + jb), lane);
        }
      }
      for (int64_t j = 0; j < cnt; ++j) {
        const __m512i idx = _mm512_add_epi8(base, _mm512_set1_epi8(static_cast<char>(j)));
        const __m512i pairs = _mm512_mask_blend_epi8(kUpperRows, _mm512_permutex2var_epi8(z[0], idx, z[1]),
                                                     _mm512_permutex2var_epi8(z[2], idx, z[3]));
        _mm512_store_si512(buf + ((jb + j) * 2 + h) * 16,
                           _mm512_and_si512(_mm512_multishift_epi64_epi8(fields, pairs), three));
      }
    }
  }
}

const bool kHasVbmi = __builtin_cpu_supports("avx512vbmi");

// Writes V = 256 hi + lo of 16 rows (lanes) to out[0, valid).
inline void store_rows(const IntArgs& a, int64_t m, int64_t n, __m512i hi, __m512i lo, int valid) {
  const __mmask16 mask = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  if (a.out32) {  // K <= kInt32MaxK: no overflow
    _mm512_mask_storeu_epi32(a.out32 + m * a.N + n, mask, _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo));
    return;
  }
  for (int half = 0; half < 2; ++half) {
    const __m512i h64 = _mm512_cvtepi32_epi64(half ? _mm512_extracti64x4_epi64(hi, 1) : _mm512_castsi512_si256(hi));
    const __m512i l64 = _mm512_cvtepi32_epi64(half ? _mm512_extracti64x4_epi64(lo, 1) : _mm512_castsi512_si256(lo));
    _mm512_mask_storeu_epi64(a.out64 + m * a.N + n + 8 * half, static_cast<__mmask8>(mask >> (8 * half)),
                             _mm512_add_epi64(_mm512_slli_epi64(h64, 8), l64));
  }
}

// MT tokens from m x the 32 rows of the tile at n, over all K4 chunks. Per lane, hi sums at most
// K4 * 4 * 3 * 127 (no int32 overflow below K4 = 1.4 million); they are combined on store.
// noinline: a function of its own gets the whole register file for its 4 * MT accumulators;
// inlined into the tile loop GCC kept some of them in memory.
template <int MT>
__attribute__((noinline)) void gemm_micro(const IntArgs& a, const uint32_t* w, int64_t m, int64_t n, int rows) {
  const int8_t* act = a.act + m * a.act_stride;
  __m512i hi[MT][2], lo[MT][2];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) hi[t][0] = hi[t][1] = lo[t][0] = lo[t][1] = _mm512_setzero_si512();
  // Two base pointers and the stride in a register: every token's address is then a base plus
  // 0, 1 or 2 strides (an x86 addressing mode), so the loop needs no per-token pointer registers.
  const int64_t s = a.act_stride;
  const int8_t* p0 = act;
  const int8_t* p3 = act + 3 * s;
  const uint32_t* const wend = w + a.K4 * 32;
#pragma GCC unroll 2
  for (; w < wend; w += 32, p0 += 8, p3 += 8) {
    const __m512i w0 = _mm512_load_si512(w);
    const __m512i w1 = _mm512_load_si512(w + 16);
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      const int8_t* p = (t < 3 ? p0 : p3) + (t % 3) * s;
      const __m512i ah = _mm512_broadcastd_epi32(_mm_loadu_si32(p));
      const __m512i al = _mm512_broadcastd_epi32(_mm_loadu_si32(p + 4));
      hi[t][0] = _mm512_dpbusd_epi32(hi[t][0], w0, ah);
      hi[t][1] = _mm512_dpbusd_epi32(hi[t][1], w1, ah);
      lo[t][0] = _mm512_dpbusd_epi32(lo[t][0], w0, al);
      lo[t][1] = _mm512_dpbusd_epi32(lo[t][1], w1, al);
    }
  }
  // Fully unrolled: run-time indices into the accumulators would also push them to memory.
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
      if (rows > 16 * h) store_rows(a, m + t, n + 16 * h, hi[t][h], lo[t][h], rows - 16 * h > 16 ? 16 : rows - 16 * h);
}

void gemm_tokens(const IntArgs& a, const uint32_t* w, int64_t m, int64_t mt, int64_t n, int rows) {
  switch (mt) {
    case 1: gemm_micro<1>(a, w, m, n, rows); break;
    case 2: gemm_micro<2>(a, w, m, n, rows); break;
    case 3: gemm_micro<3>(a, w, m, n, rows); break;
    case 4: gemm_micro<4>(a, w, m, n, rows); break;
    case 5: gemm_micro<5>(a, w, m, n, rows); break;
    default: gemm_micro<6>(a, w, m, n, rows); break;
  }
}

// ------------------------------------------------------------------ float, plane layout

// One row, MT tokens; two accumulators per token so consecutive FMAs do not wait on each other.
template <int MT>
void float_plane_row(const FloatArgs& a, int64_t n, int64_t m0) {
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);  // index & 3
  const uint8_t* row = a.codes + n * a.K4;
  const float* acts[MT];
  for (int t = 0; t < MT; ++t) acts[t] = a.act + (m0 + t) * a.G * kGroupElems;
  __m512 acc[MT][2];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    for (int q = 0; q < 4; ++q) {
      const int64_t left = a.K4 - g * kGroupCodes - 16 * q;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, row + g * kGroupCodes + 16 * q));
      // vpermps reads only the low 4 index bits, so (c >> s) needs no mask.
      const __m512 z0 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 6), lut);
      const __m512 z1 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut);
      const __m512 z2 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 2), lut);
      const __m512 z3 = _mm512_permutexvar_ps(c, lut);
      const int64_t off = g * kGroupElems + 16 * q;
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) {
        const float* p = acts[t] + off;
        acc[t][0] = _mm512_fmadd_ps(z0, _mm512_loadu_ps(p), acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(z1, _mm512_loadu_ps(p + 64), acc[t][1]);
        acc[t][0] = _mm512_fmadd_ps(z2, _mm512_loadu_ps(p + 128), acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(z3, _mm512_loadu_ps(p + 192), acc[t][1]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) a.out[(m0 + t) * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

template <int MT>
void float_plane_rows(const FloatArgs& a, int64_t n0, int64_t n1, int64_t m0) {
  for (int64_t n = n0; n < n1; ++n) float_plane_row<MT>(a, n, m0);
}

// LUT GEMV (kernel_api.h's table-lookup kernels) on one full block of kLutRows rows, MT tokens:
// the AVX2 kernel (kernels_avx2.cpp lut_block) on two code bytes j, j+1 per 64-byte vector.
//  - One load of a token's tables gives [low j | high j | low j+1 | high j+1] (16 bytes each), so
//    the indices go in as [I_j | I_j | I_j+1 | I_j+1]: vshufi32x4 duplicates the codes' 128-bit
//    lanes once per code-byte pair for all tokens, and each vpshufb looks up the low and the high
//    bytes of 8 rows' two planes for both code bytes.
//  - vpmaddubsw reads the looked-up bytes as unsigned, the high bytes are signed: the high lanes
//    of the tables are flipped by 0x80 after the load (h + 128: 0..255), which adds 3 * 128 per
//    code byte to a row's high sum, 256 * 384 per code byte in all; taken off at the end.
//  - Per lane and int16 sum at most 3 * 255 per code-byte pair (both planes' bytes [1, 2]), 32
//    pairs (kLutWiden512 code bytes): 24480 < 2^15; then vpmaddwd by [1, 256] into int32, two
//    row groups per vector (at most 257 * 24480 per lane and widening), into int64 every
//    kLutFold512 code bytes (256 widenings: < 2^31).
// Per 256 products and token: 4 shuffles, 4 byte multiplies, 4 adds and an xor, against the AVX2
// kernel's 8 + 8 + 8 per 256.
constexpr int64_t kLutWiden512 = 64;
constexpr int64_t kLutFold512 = 16384;

template <bool kOdd>
inline __m512i load_pair(const uint8_t* p) {  // 64 bytes, or 32 and zeros
  return kOdd ? _mm512_maskz_loadu_epi8(__mmask64(0xFFFFFFFF), p) : _mm512_loadu_si512(p);
}

// Code bytes j, j+1 of a block for MT tokens, into sum[t][g] (row group g: rows 8g .. 8g+7), as
// [low j | high j | low j+1 | high j+1]. kOdd: j is the last code byte, the second half zero
// (index 0 looks up e[0] = 0, and its high lanes come out 0x80: the bias taken off for every slot).
template <int MT, bool kOdd>
inline void lut_pair(const uint8_t* codes, const uint8_t* const (&tables)[MT], int64_t j, __m512i (&sum)[MT][4]) {
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m512i planes = _mm512_set1_epi16(0x0201);  // bytes [1, 2]
  const long long f = static_cast<long long>(0x8080808080808080ull);
  const __m512i flip = _mm512_set_epi64(f, f, 0, 0, f, f, 0, 0);  // the high lanes' bytes
  _mm_prefetch(reinterpret_cast<const char*>(codes + kLutRows * j + kLutPrefetchBytes), _MM_HINT_T1);  // (one line per pair)
  const __m512i c = load_pair<kOdd>(codes + kLutRows * j);
  const __m512i x = _mm512_shuffle_i32x4(c, c, 0xA0), y = _mm512_shuffle_i32x4(c, c, 0xF5);
  const __m512i idx[4] = {_mm512_and_si512(x, low4), _mm512_and_si512(_mm512_srli_epi16(x, 4), low4),
                          _mm512_and_si512(y, low4), _mm512_and_si512(_mm512_srli_epi16(y, 4), low4)};
  for (int t = 0; t < MT; ++t) {
    const __m512i tb = _mm512_xor_si512(load_pair<kOdd>(tables[t] + kLutTableBytes * j), flip);
    for (int g = 0; g < 4; ++g)
      add_epi16_in_place(sum[t][g], _mm512_maddubs_epi16(_mm512_shuffle_epi8(tb, idx[g]), planes));
  }
}

template <int MT>
void lut_block(const IntArgs& a, int64_t nb, int64_t m0) {
  const __m512i hi_lo = _mm512_set1_epi32(0x01000001);  // int16 [1, 256]
  const uint8_t* codes = a.codes + nb * kLutRows * a.K4;
  const uint8_t* tables[MT];
  for (int t = 0; t < MT; ++t) tables[t] = reinterpret_cast<const uint8_t*>(a.act + (m0 + t) * a.act_stride);
  int64_t total[MT][kLutRows] = {};
  const int64_t bias = 256 * 384 * ((a.K4 + 1) / 2 * 2);  // every code-byte slot's flipped high bytes
  for (int64_t f0 = 0; f0 < a.K4; f0 += kLutFold512) {
    const int64_t f1 = imin(a.K4, f0 + kLutFold512);
    __m512i acc[MT][4];  // row groups 0|1 rows 0-3, 0|1 rows 4-7, 2|3 rows 0-3, 2|3 rows 4-7
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_si512();
    for (int64_t w0 = f0; w0 < f1; w0 += kLutWiden512) {
      const int64_t w1 = imin(f1, w0 + kLutWiden512);
      __m512i sum[MT][4];
      for (int t = 0; t < MT; ++t)
        for (int g = 0; g < 4; ++g) sum[t][g] = _mm512_setzero_si512();
      int64_t j = w0;
      for (; j + 1 < w1; j += 2) lut_pair<MT, false>(codes, tables, j, sum);
      if (j < w1) lut_pair<MT, true>(codes, tables, j, sum);
      // lanes [low, high] of groups g, g+1 side by side (vshufi32x4 0x88: lanes 0, 2 of each; 0xDD:
      // lanes 1, 3), int16 pairs (low, high) per row, vpmaddwd: lanes (g, j), (g, j+1), (g+1, j), (g+1, j+1)
      for (int t = 0; t < MT; ++t)
        for (int h = 0; h < 2; ++h) {
          const __m512i lo = _mm512_shuffle_i32x4(sum[t][2 * h], sum[t][2 * h + 1], 0x88);
          const __m512i hi = _mm512_shuffle_i32x4(sum[t][2 * h], sum[t][2 * h + 1], 0xDD);
          acc[t][2 * h] = _mm512_add_epi32(acc[t][2 * h], _mm512_madd_epi16(_mm512_unpacklo_epi16(lo, hi), hi_lo));
          acc[t][2 * h + 1] = _mm512_add_epi32(acc[t][2 * h + 1], _mm512_madd_epi16(_mm512_unpackhi_epi16(lo, hi), hi_lo));
        }
    }
    if (a.out32 && f1 - f0 == a.K4) {  // one fold (K4 <= kLutFold512): the int32 sums are the totals
      const __m512i bias32 = _mm512_set1_epi32(static_cast<int32_t>(bias));  // (K4 <= kLutFold512: it fits)
      for (int t = 0; t < MT; ++t) {
        __m512i u[4];  // lanes 0 and 2: the sums of code bytes j and j+1, rows as in acc
        for (int i = 0; i < 4; ++i)
          u[i] = _mm512_add_epi32(acc[t][i], _mm512_shuffle_i32x4(acc[t][i], acc[t][i], 0xB1));
        __m512i* out = reinterpret_cast<__m512i*>(a.out32 + (m0 + t) * a.N + nb * kLutRows);
        for (int h = 0; h < 2; ++h) {  // rows 16h .. 16h+15: lanes [u0.0, u0.2, u1.0, u1.2] put in row order
          const __m512i w = _mm512_shuffle_i32x4(u[2 * h], u[2 * h + 1], 0x88);
          const __m512i rows = _mm512_shuffle_i32x4(w, w, 0xD8);
          _mm512_storeu_si512(out + h, _mm512_slli_epi32(_mm512_sub_epi32(rows, bias32), 2));
        }
      }
      return;
    }
    for (int t = 0; t < MT; ++t)
      for (int i = 0; i < 4; ++i) {
        alignas(64) int32_t v[16];
        _mm512_store_si512(reinterpret_cast<__m512i*>(v), acc[t][i]);
        for (int q = 0; q < 4; ++q)  // lane q: row group 2 (i / 2) + q / 2, rows 4 (i % 2) .. +3
          for (int r = 0; r < 4; ++r) total[t][8 * (2 * (i / 2) + q / 2) + 4 * (i % 2) + r] += v[4 * q + r];
      }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < kLutRows; ++r) a.store(m0 + t, nb * kLutRows + r, 4 * (total[t][r] - bias));
}

}  // namespace

void int_plane_avx512(const IntArgs& a, int64_t n0, int64_t n1) {
  // (one pass over the rows for one token, or a pair: nothing to keep in L1 between passes)
  if (a.M == 1) return int_plane_rows<1>(a, n0, n1, 0);
  const bool pairs = 2 * a.act_stride <= kPairActBytes;
  if (a.M == 2 && pairs) return int_plane_rows<2>(a, n0, n1, 0);
  for (int64_t t0 = n0; t0 < n1; t0 += kGemvSubTile) {
    const int64_t t1 = imin(n1, t0 + kGemvSubTile);
    int64_t m0 = 0;
    for (; pairs && m0 + 1 < a.M; m0 += 2) int_plane_rows<2>(a, t0, t1, m0);
    for (; m0 < a.M; ++m0) int_plane_rows<1>(a, t0, t1, m0);
  }
}

void int_gemm_avx512(const IntArgs& a, int64_t n0, int64_t n1) {
  // Tiles of 32 rows are unpacked for the whole of K (128 * K4 bytes: 128 KB at K = 4096, in L2)
  // and reused by every token of a block; blocks of tokens are sized so their activations stay
  // in L2 too. Each (token, row) is then finished in registers and stored once.
  uint32_t* buf = a.scratch;
  const int64_t block = imin(a.M, kMicroTokens * (1 + kActBlockBytes / (a.act_stride * kMicroTokens)));
  for (int64_t mb = 0; mb < a.M; mb += block) {
    const int64_t mend = imin(a.M, mb + block);
    for (int64_t t0 = n0; t0 < n1; t0 += 32) {
      const int rows = static_cast<int>(imin(32, n1 - t0));
      (kHasVbmi ? unpack_tile_vbmi : unpack_tile)(a.codes + t0 * a.K4, a.K4, rows, buf);
      // the next tile's codes into L2 while this one multiplies: unpacking reads 32 rows at once,
      // K4 bytes apart, a pattern the hardware prefetchers do not follow
      const uint8_t* next = a.codes + (t0 + 32) * a.K4;
      const uint8_t* end = a.codes + imin(n1, t0 + 64) * a.K4;
      for (; next < end; next += 64) _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
      for (int64_t m = mb; m < mend; m += kMicroTokens) gemm_tokens(a, buf, m, imin(kMicroTokens, mend - m), t0, rows);
    }
  }
}

void lut_gemv_avx512(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t full = a.N / kLutRows * kLutRows;  // rows in full blocks; the rest: the portable kernel
  for (int64_t nb = n0 / kLutRows; nb < imin(n1, full) / kLutRows; ++nb) {
    int64_t m0 = 0;
    for (; m0 + 2 <= a.M; m0 += 2) lut_block<2>(a, nb, m0);
    if (m0 < a.M) lut_block<1>(a, nb, m0);
  }
  if (n1 > full) lut_gemv_scalar(a, full > n0 ? full : n0, n1);
}

void float_plane_avx512(const FloatArgs& a, int64_t n0, int64_t n1) {
  for (int64_t t0 = n0; t0 < n1; t0 += kRowTile) {
    const int64_t t1 = imin(n1, t0 + kRowTile);
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) {
      switch (imin(8, a.M - m0)) {
        case 1: float_plane_rows<1>(a, t0, t1, m0); break;
        case 2: float_plane_rows<2>(a, t0, t1, m0); break;
        case 3: float_plane_rows<3>(a, t0, t1, m0); break;
        case 4: float_plane_rows<4>(a, t0, t1, m0); break;
        case 5: float_plane_rows<5>(a, t0, t1, m0); break;
        case 6: float_plane_rows<6>(a, t0, t1, m0); break;
        case 7: float_plane_rows<7>(a, t0, t1, m0); break;
        default: float_plane_rows<8>(a, t0, t1, m0); break;
      }
    }
  }
}

// ------------------------------------------------------------------ mode lut3 on the GEMM

int64_t lut3_requantize_avx512(int8_t* act, int64_t chunks) {
  // per 128-bit lane two chunks [h0-h3 l0-l3 H0-H3 L0-L3] <-> int16 lanes (lo, hi), and back
  const __m512i to16 = _mm512_broadcast_i32x4(_mm_setr_epi8(4, 0, 5, 1, 6, 2, 7, 3, 12, 8, 13, 9, 14, 10, 15, 11));
  const __m512i to8 = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 3, 5, 7, 0, 2, 4, 6, 9, 11, 13, 15, 8, 10, 12, 14));
  const __m512i one = _mm512_set1_epi16(1), bit7 = _mm512_set1_epi16(0x80), low = _mm512_set1_epi16(0xFF);
  const __m512i half = _mm512_set1_epi16(128);
  __m512i sum_q = _mm512_setzero_si512(), sum_q3 = _mm512_setzero_si512();
  for (int64_t j = 0; j < chunks; j += 8) {
    int8_t* p = act + 8 * j;
    // the bytes (lo, hi) as int16 are q + 256 where lo < 0
    const __m512i w = _mm512_shuffle_epi8(_mm512_loadu_si512(p), to16);
    const __m512i q = _mm512_sub_epi16(w, _mm512_slli_epi16(_mm512_and_si512(w, bit7), 1));
    const __m512i q3 = lut3_q_epi16(q);
    sum_q = _mm512_add_epi32(sum_q, _mm512_madd_epi16(q, one));
    sum_q3 = _mm512_add_epi32(sum_q3, _mm512_madd_epi16(q3, one));
    // lo = the low byte of q3, hi = (q3 + 128) >> 8
    const __m512i w3 = _mm512_or_si512(_mm512_and_si512(q3, low),
                                       _mm512_slli_epi16(_mm512_srai_epi16(_mm512_add_epi16(q3, half), 8), 8));
    _mm512_storeu_si512(p, _mm512_shuffle_epi8(w3, to8));
  }
  // (each int32 lane within 2 * 32512 * chunks / 8: exact up to K = 10^6; the totals in int64)
  return 2 * sum_epi32_i64(sum_q) - 2 * kLut3Step * sum_epi32_i64(sum_q3);
}

}  // namespace cpu
}  // namespace pyquant

#pragma GCC pop_options
