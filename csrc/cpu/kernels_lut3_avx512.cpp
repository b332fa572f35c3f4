// Mode "lut3" on AVX-512 with VBMI2 (Ice Lake, Sapphire Rapids, Zen 4 and later): the triple-lookup
// GEMV of kernel_api.h. Per 32 rows, chunk of 8 triples and token: the chunk's 3 code vectors give
// the 8 index vectors (5 shifts, 2 vpshrdw, made again for each token), each looked up in its triple's
// 64-entry table (two registers, vpermi2w), four lookups summed in int16 (all eight in a narrow
// chunk, kernel_api.h), then widened into even- and odd-row int32 sums (vpdpwssd by 1 in the low
// or the high word).
//
// Blocking: up to 4 blocks of 32 rows (one group of the layout) share each table load (the load
// port, one 64-byte load per cycle on Zen 4, is what a single block would wait on); ranges of
// chunks keep codes and tables in cache between groups and tokens (the layout's bands and ranges);
// tokens go in blocks of kTokenBlock. The first token's pass prefetches the codes ahead (a band's
// ranges, and the bands, are one stream). A prototype of the same loop (Zen 4, one thread, codes in L2,
// 1024 x 3072) ran 173 G multiply-adds/s at one token and 165 at 2-8, the int GEMV ~92; whole layer
// calls from memory gain 1.1-1.35x at 4-32 tokens (benchmarks/lut3_bench.py, suite.py).
#include <immintrin.h>

#include <cstring>

#include "kernel_api.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi2")

#include "avx512_common.h"

namespace pyquant {
namespace cpu {
namespace {

constexpr int64_t kTokenBlock = 8;
static_assert(kLut3RangeChunks == 16, "a range's narrow bits are read as two bytes");
// The kernel goes over spans of whole bands (kernel_api.h), up to kSpanRows rows (4 bands), one
// range of chunks at a time, each range over the span's groups and then over the tokens: a group's
// codes for the range (12 KB) stay in L1 from one token to the next, and the tokens' tables for
// it (16 KB each) in L1 or L2 from one group to the next; partial sums wait in `acc` (64 KB).
// Without ranges (all of K per group and token) the tables of a long row (459 KB per token at
// K = 11008) and the codes streaming past evict each other from L2. Zen 4, 11008 -> 4096 from
// memory (lut3_bench.py): 4 tokens, 1 thread: ranges of 16 chunks 1.57 ms, 32 1.57, 64 1.61, none
// 1.83 (int mode 2.02-2.11); at 32 tokens, 2 threads, spans of 2 groups re-read 8 tokens' tables
// per span from L3 (11.5 ms, int mode 7.7), of 16 groups 8.1 (int 7.7).
constexpr int64_t kSpanRows = kLut3SpanRows;
// Codes are prefetched into L2 (prefetcht1) in the first token's pass, each line twice: 32 KB and
// again 16 KB ahead. One prefetch alone leaves a share of the lines to come from memory on demand
// (as if it were dropped when the core's queue of misses is full); the second asks again, in time.
// Zen 4, from memory, one token, one thread (kernel_bench, 3 runs each side by side): 4096 x 4096
// one prefetch 16 KB ahead 173-178 us, 32 + 16 KB 136-144 (a plain read of the same codes 130-140);
// 4096 -> 11008 484-506 -> 372-416 us; 11008 -> 4096 552 -> 483-493. One prefetch 64 KB ahead
// 179-202 us, 32 KB 177-184, twice 32 KB ahead as once; into L1 (prefetcht0) 332-341. (Earlier,
// one prefetch: none 384 us, 4 KB 204, 16 KB 165-183.)
constexpr int64_t kPrefetchFar = 32768, kPrefetchNear = 16384;

// R blocks of 32 rows (blocks of one group, one after another), `chunks` chunks of one range, one
// token: rec is the first block's record of the first chunk, e that chunk's tables, narrow the
// chunks' narrow bits (bit c for chunk c of the range). Adds the sums of table entries to
// acc[0, 32 R) (row order) or stores them there (first).
// kStream: the first token's pass, whose codes come from memory: it prefetches them, and it
// widens every four lookups and lets gcc load the code vectors as it likes. The narrow chunks'
// branch and the vectors kept in registers speed up the passes that find the codes in cache, but
// slowed this one (Zen 4, one thread, one token, from memory, 3 runs each: 4096 x 4096 144-166 ->
// 175-186 us, 4096 -> 11008 379-451 -> 488-541; the narrow branch alone 4096 x 4096 152-154 ->
// 158-172 us, 11008 -> 4096 404-457 -> 441-523).
template <int R, bool kStream>
void lut3_rows(const uint16_t* rec, const int16_t* e, uint32_t narrow, int64_t chunks, bool first, int32_t* acc) {
  const __m512i even = _mm512_set1_epi32(1), odd = _mm512_set1_epi32(1 << 16);
  __m512i ae[R], ao[R], s[R];
  // Every loop over the blocks is unrolled early (the pragmas): unrolled late, gcc keeps the
  // arrays on the stack, for dpwssd_in_place's asm takes their elements by reference. Widening in
  // place (no copies of the accumulators in and out) took the loop from 164 instructions to 147
  // (R = 4, the passes after the first token's) and 2-4 % off the time (Zen 4, one thread, both
  // versions alternating call by call on one layer in L2: 4096 -> 512 at 1-16 tokens 0.96-0.99x,
  // 11008 -> 2048 at 4 tokens 0.97x).
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) ae[r] = ao[r] = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    const uint16_t* p = rec + c * (kLut3ChunkBytes / 2);
    if (kStream) {
      const char* ahead = reinterpret_cast<const char*>(p);
      for (int line = 0; line < 3 * R; ++line) _mm_prefetch(ahead + kPrefetchFar + 64 * line, _MM_HINT_T1);
      for (int line = 0; line < 3 * R; ++line) _mm_prefetch(ahead + kPrefetchNear + 64 * line, _MM_HINT_T1);
    }
    const int16_t* t = e + c * (kLut3TableBytes / 2);
    __m512i w0[R], w1[R], w2[R];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      w0[r] = _mm512_loadu_si512(p + 96 * r);
      w1[r] = _mm512_loadu_si512(p + 96 * r + 32);
      // (else gcc loads each code vector again into each instruction that cuts an index from it:
      // Zen 4, one thread, codes in cache, 4096 x 4096, 1 / 2 / 8 tokens 121 / 234 / 870 -> 109 /
      // 221 / 813 us)
      if (!kStream) {
        keep_in_register(w0[r]);
        keep_in_register(w1[r]);
      }
    }
    // triples 0-3: word 0, and word 1's low bits
    for (int j = 0; j < 4; ++j) {
      const __m512i tl = _mm512_load_si512(t + 64 * j), th = _mm512_load_si512(t + 64 * j + 32);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i index = j == 0   ? w0[r]
                              : j == 1 ? _mm512_srli_epi16(w0[r], 6)
                              : j == 2 ? _mm512_shrdi_epi16(w0[r], w1[r], 12)
                                       : _mm512_srli_epi16(w1[r], 2);
        const __m512i v = _mm512_permutex2var_epi16(tl, index, th);
        s[r] = j == 0 ? v : _mm512_add_epi16(s[r], v);
      }
    }
    // a narrow chunk's eight lookups add up in int16 (kernel_api.h); another's widen by four
    if (kStream || !(narrow >> c & 1)) {
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        dpwssd_in_place(ae[r], s[r], even);
        dpwssd_in_place(ao[r], s[r], odd);
        s[r] = _mm512_setzero_si512();
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      w2[r] = _mm512_loadu_si512(p + 96 * r + 64);
      if (!kStream) keep_in_register(w2[r]);
    }
    // triples 4-7: word 1's high bits, word 2
    for (int j = 4; j < 8; ++j) {
      const __m512i tl = _mm512_load_si512(t + 64 * j), th = _mm512_load_si512(t + 64 * j + 32);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i index = j == 4   ? _mm512_srli_epi16(w1[r], 8)
                              : j == 5 ? _mm512_shrdi_epi16(w1[r], w2[r], 14)
                              : j == 6 ? _mm512_srli_epi16(w2[r], 4)
                                       : _mm512_srli_epi16(w2[r], 10);
        s[r] = _mm512_add_epi16(s[r], _mm512_permutex2var_epi16(tl, index, th));
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      dpwssd_in_place(ae[r], s[r], even);
      dpwssd_in_place(ao[r], s[r], odd);
    }
  }
  // even rows in ae's lanes, odd rows in ao's: back to row order
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    __m512i a = _mm512_permutex2var_epi32(ae[r], lo, ao[r]), b = _mm512_permutex2var_epi32(ae[r], hi, ao[r]);
    int32_t* o = acc + 32 * r;
    if (!first) {
      a = _mm512_add_epi32(a, _mm512_loadu_si512(o));
      b = _mm512_add_epi32(b, _mm512_loadu_si512(o + 16));
    }
    _mm512_storeu_si512(o, a);
    _mm512_storeu_si512(o + 16, b);
  }
}

using RowsFn = void (*)(const uint16_t*, const int16_t*, uint32_t, int64_t, bool, int32_t*);
constexpr RowsFn kRows[2][5] = {  // [kStream][R]
    {nullptr, lut3_rows<1, false>, lut3_rows<2, false>, lut3_rows<3, false>, lut3_rows<4, false>},
    {nullptr, lut3_rows<1, true>, lut3_rows<2, true>, lut3_rows<3, true>, lut3_rows<4, true>}};

}  // namespace

void lut3_tables_avx512(const int8_t* act, int64_t K4, uint8_t* tables) {
  const int64_t C = lut3_chunks(K4), K = 4 * K4, G = (K4 + kGroupCodes - 1) / kGroupCodes;
  auto* e = reinterpret_cast<int16_t*>(tables + kLut3HeadBytes);
  // First q3 in the order s, zero up to 24 C, in the tail of the tables' own space: triple t's
  // entries (bytes [128 t, 128 t + 128)) then never reach a triple's q3 not yet read (from byte
  // 976 C + 6 t on).
  int16_t* q3 = e + 488 * C;
  const __m512i one = _mm512_set1_epi16(1);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t P = K4 - 64 * g < 64 ? K4 - 64 * g : 64;
    const __mmask64 lanes = P >= 64 ? ~__mmask64(0) : ((__mmask64(1) << P) - 1);
    for (int i = 0; i < 4; ++i)
      for (int half = 0; half < 2; ++half) {
        const int8_t* ah = act + g * 512 + 64 * i + 32 * half;
        const __m512i q = _mm512_add_epi16(
            _mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ah))), 8),
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ah + 256))));
        const __m512i v = lut3_q_epi16(q);
        const auto mask = static_cast<__mmask32>(lanes >> (32 * half));
        _mm512_mask_storeu_epi16(q3 + 256 * g + P * i + 32 * half, mask, v);
        sum = _mm512_add_epi32(sum, _mm512_madd_epi16(q, one));  // (padding lanes: q = 0)
      }
  }
  for (int64_t s = K; s < 24 * C; ++s) q3[s] = 0;
  // A chunk at a time: its 24 q3 read before its entries overwrite them (they end at byte 1024 (c + 1),
  // the next chunk's q3 start at 976 C + 48 (c + 1)); lane j of t0, t1, t2 holds triple j's q3.
  // A table's low half (indices 0-31, z_2 = 0 or 1) is (z_0 - 2) q3_0 + (z_1 - 2) q3_1 - 2 q3_2 - o
  // plus q3_2 in lanes 16-31 (z_2 = 1), its high half (z_2 = 2 or 3) the low one plus 2 q3_2: two
  // multiplies per triple, not six, and no scalar work (Zen 4, one thread, one token, kernel_bench
  // with PYQUANT_BENCH_LUT3_TABLES=only: K = 4096 4.8-6.4 -> 3.3-3.8 us, K = 11008 17-23 -> 9.6-10.1;
  // 8 tokens at K = 4096 39-40 -> 28-31).
  alignas(64) int16_t pattern[2][32];
  for (int index = 0; index < 32; ++index)
    for (int w = 0; w < 2; ++w) pattern[w][index] = static_cast<int16_t>((index >> (2 * w) & 3) - 2);
  const __m512i z0 = _mm512_load_si512(pattern[0]), z1 = _mm512_load_si512(pattern[1]);
  constexpr __mmask32 kZ2Odd = 0xFFFF0000u;
  const __m512i first = _mm512_cvtepi8_epi16(_mm256_setr_epi8(0, 3, 6, 9, 12, 15, 18, 21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m512i narrow_limit = _mm512_set1_epi16(kLut3NarrowSpan);  // (lut3_narrow's rule, 8 triples at once)
  uint8_t* narrow = lut3_narrow_bits(tables, C);
  std::memset(narrow, 0, lut3_narrow_bytes(C));
  __m256i offsets = _mm256_setzero_si256();  // (int32: |o| <= 2709, 8 lanes, C chunks)
  for (int64_t c = 0; c < C; ++c) {
    // (lanes 24-31: the next chunk's q3, or for the last one the zeroed narrow bits after the
    // entries: within the tables either way, and unused)
    const __m512i q = _mm512_loadu_si512(q3 + 24 * c);
    const __m512i t0 = _mm512_permutexvar_epi16(first, q), t1 = _mm512_permutexvar_epi16(_mm512_add_epi16(first, one), q),
                  t2 = _mm512_permutexvar_epi16(_mm512_add_epi16(first, _mm512_add_epi16(one, one)), q);
    // lut3_offset and lut3_narrow of the 8 triples
    const __m512i o = _mm512_srai_epi16(_mm512_sub_epi16(_mm512_setzero_si512(),
                                                         _mm512_add_epi16(_mm512_add_epi16(t0, t1), t2)), 1);
    offsets = _mm256_add_epi32(offsets, _mm256_cvtepi16_epi32(_mm512_castsi512_si128(o)));
    const __m512i span = _mm512_add_epi16(_mm512_add_epi16(_mm512_abs_epi16(t0), _mm512_abs_epi16(t1)), _mm512_abs_epi16(t2));
    if ((_mm512_cmple_epi16_mask(_mm512_add_epi16(span, _mm512_add_epi16(span, span)), narrow_limit) & 0xFF) == 0xFF)
      narrow[c / 8] = static_cast<uint8_t>(narrow[c / 8] | 1 << (c % 8));
    const __m512i base = _mm512_sub_epi16(_mm512_sub_epi16(_mm512_setzero_si512(), _mm512_add_epi16(t2, t2)), o);
    int16_t* out = e + 512 * c;
    __m512i j_lanes = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j, j_lanes = _mm512_add_epi16(j_lanes, one)) {
      const __m512i q2 = _mm512_permutexvar_epi16(j_lanes, t2);
      const __m512i lo = _mm512_add_epi16(
          _mm512_add_epi16(_mm512_mullo_epi16(z0, _mm512_permutexvar_epi16(j_lanes, t0)),
                           _mm512_mullo_epi16(z1, _mm512_permutexvar_epi16(j_lanes, t1))),
          _mm512_permutexvar_epi16(j_lanes, base));
      const __m512i l = _mm512_mask_add_epi16(lo, kZ2Odd, lo, q2);
      _mm512_storeu_si512(out + 64 * j, l);
      _mm512_storeu_si512(out + 64 * j + 32, _mm512_add_epi16(l, _mm512_add_epi16(q2, q2)));
    }
  }
  const int64_t offsets_sum = _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(offsets));
  // (each lane's sum is within 2 * 32512 * K / 32: int32 up to K = 10^6; their total is not)
  *reinterpret_cast<int64_t*>(tables) = kLut3Step * offsets_sum + 2 * sum_epi32_i64(sum);
}

void lut3_gemv_avx512(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t C = lut3_chunks(a.K4);
  const int64_t b_end = (n1 + 31) / 32;  // blocks of 32 rows (the last may hold rows past N: zero codes)
  alignas(64) int32_t acc[kTokenBlock][kSpanRows];
  for (int64_t m0 = 0; m0 < a.M; m0 += kTokenBlock) {
    const int64_t mt = a.M - m0 < kTokenBlock ? a.M - m0 : kTokenBlock;
    // One token goes a band at a time (its codes then one stream in address order); so do two or
    // three tokens on rows up to K ~ 6000 (kernel_bench, 4096 x 4096, one thread, group after
    // group: 2 tokens 338-341 -> 283-285 us, 3 tokens 459-533 -> 391-421; from 4 tokens no
    // better, and at K = 11008 two tokens were slower: 832-850 -> 903-945).
    const bool few = mt == 1 || (mt <= 3 && a.act_stride < (256 << 10));
    const int64_t span = (few ? kLut3BandGroups * kLut3Rows : kSpanRows) / 32;  // in blocks
    for (int64_t b0 = n0 / 32, b1; b0 < b_end; b0 = b1) {
      b1 = imin(b_end, (b0 / span + 1) * span);  // (spans of whole bands)
      for (int64_t c0 = 0; c0 < C; c0 += kLut3RangeChunks) {
        const int64_t chunks = imin(C - c0, kLut3RangeChunks);
        for (int64_t b = b0; b < b1;) {
          const int64_t R = imin(4 - b % 4, b1 - b);
          const uint16_t* rec = reinterpret_cast<const uint16_t*>(a.codes) + lut3_word(32 * b, a.N, C, c0);
          for (int64_t m = 0; m < mt; ++m) {
            const auto* tables = reinterpret_cast<const uint8_t*>(a.act + (m0 + m) * a.act_stride);
            const auto* e = reinterpret_cast<const int16_t*>(tables + kLut3HeadBytes) + c0 * (kLut3TableBytes / 2);
            const uint8_t* bits = lut3_narrow_bits(tables, C) + c0 / 8;  // (c0: a multiple of 16)
            const uint32_t narrow = bits[0] | static_cast<uint32_t>(bits[1]) << 8;
            kRows[m == 0][R](rec, e, narrow, chunks, c0 == 0, acc[m] + 32 * (b - b0));
          }
          b += R;
        }
      }
      for (int64_t m = 0; m < mt; ++m) {
        const int64_t cst = *reinterpret_cast<const int64_t*>(a.act + (m0 + m) * a.act_stride);
        for (int64_t n = 32 * b0; n < imin(32 * b1, n1); ++n) a.store(m0 + m, n, kLut3Step * acc[m][n - 32 * b0] + cst);
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyquant

#pragma GCC pop_options
