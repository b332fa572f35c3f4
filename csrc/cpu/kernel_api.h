// The contract between the generic driver (qlinear.cpp) and the ISA-specific inner kernels
// (kernels_scalar.cpp everywhere; kernels_avx2.cpp, kernels_avx512.cpp and kernels_amx.cpp on x86-64,
// kernels_neon.cpp on AArch64; kernel_table.cpp lists them).
//
// Plain C++ only. The ISA files include this header before their `#pragma GCC target(...)`, so its
// inline functions are compiled for baseline x86-64 in every file; below the pragma they must not
// instantiate anything inline with external linkage (torch headers, std templates), or the linker
// could keep an AVX-512 copy of it for code that runs on any CPU.
//
// What the kernels compute. Per token m the driver has transformed the activations
// (xt = per-4-chunk A^T H_in(su * x), see pyquant/format.py) and the kernels produce, per output
// row n, the unsigned INT2 dot product  sum_k z[n, k] * xt[m, k]  where z[n, 4j + i] is the i-th
// 2-bit field of code byte codes[n, j] (z0 in the two high bits).
//
// Two activation encodings ("modes"):
//  - int:   xt is rounded to 16-bit fixed point per token, q = round(xt / s) with |q| <= kQMax,
//           and split q = 256 * hi + lo with hi in [-127, 127], lo in [-128, 127]. The kernels
//           return the exact integer  V = 256 * sum z*hi + sum z*lo  (int32 or int64), so every ISA and
//           every blocking gives bit-identical results; u8 x s8 products are what VNNI's vpdpbusd
//           (and AVX2's vpmaddubsw) multiply.
//  - float: xt stays fp32; the kernels return the fp32 dot product.
//
// Activation layouts (per token, K padded with zeros to G * 256 elements, G = ceil(K4 / 64)):
//  - plane:   for group g (code bytes 64g .. 64g+63), plane i (0..3), lane p (0..63) the element
//             xt[256 g + 4 p + i], i.e. lane p lines up with code byte 64g + p and plane i with
//             its i-th 2-bit field. int mode: [G][hi planes 0..3, lo planes 0..3][64] int8
//             (512 bytes per group); float mode: [G][4][64] fp32.
//  - natural: int mode only, per chunk j (K4 of them, zero-padded to G * 64) the 4 hi bytes of
//             elements 4j..4j+3, then their 4 lo bytes, for the GEMM that broadcasts each dword
//             against 16 rows (one stream per token instead of two).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace pyquant {
namespace cpu {

// The smaller of two sizes (std::min needs both of one type; the kernels mix int64_t, int and constants).
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int64_t kGroupCodes = 64;              // code bytes per group
constexpr int64_t kGroupElems = 4 * kGroupCodes; // activations per group
constexpr int32_t kQMax = 127 * 256;             // int mode: |q| <= kQMax keeps hi in [-127, 127]
// q = 256 hi + lo, lo in [-128, 127]: the two int8 planes of a 16-bit activation
inline void split_q(int32_t q, int8_t* hi, int8_t* lo) {
  const int32_t h = (q + 128) >> 8;  // floor((q + 128) / 256)
  *hi = static_cast<int8_t>(h);
  *lo = static_cast<int8_t>(q - h * 256);
}
// int32 lane accumulators are folded into int64 at least every kBlockGroups groups:
// per lane 6096 per group (4 planes x 4 products x 3 x 127), times 256 for hi, times 16 lanes
// at the horizontal sum: 32 groups -> 8.0e8 < 2^31.
constexpr int64_t kBlockGroups = 32;

// |V| <= K * 3 * (256 * 127 + 128) < 2^31 up to this K: V is then written as int32, which halves
// the memory traffic of large batches; above it as int64.
constexpr int64_t kInt32MaxK = 21928;

struct IntArgs {
  const uint8_t* codes;  // [N, K4]
  int64_t N, K4, G;
  const int8_t* act;     // [M][act_stride] in the layout the kernel expects
  int64_t act_stride;    // bytes per token (G * 512)
  int64_t M;
  // [M, N]: V = 256 * sum z*hi + sum z*lo; out32 when K <= kInt32MaxK, else out64 (the other null)
  int32_t* out32;
  int64_t* out64;
  // int_gemm_avx512 only: this thread's 64-byte aligned kGemmScratch(K4) bytes
  uint32_t* scratch;
  // int_plane_amx only: all M tokens' activations already as tile operands (amx_pack_tokens), or
  // null: the kernel then transposes them itself, once per call of it
  const uint8_t* packed = nullptr;
  void store(int64_t m, int64_t n, int64_t v) const {
    if (out32) out32[m * N + n] = static_cast<int32_t>(v);
    else out64[m * N + n] = v;
  }
};

struct FloatArgs {
  const uint8_t* codes;  // [N, K4]
  int64_t N, K4, G;
  const float* act;      // [M][G * 256] plane layout
  int64_t M;
  float* out;            // [M, N]
};

// Scratch of the GEMM per thread: one unpacked tile of 32 rows x K4 codes, 4 bytes per code.
inline int64_t gemm_scratch_bytes(int64_t K4) { return 128 * K4; }

// Each kernel computes rows [n0, n1) for all M tokens; the driver threads over row ranges
// whose n0 is a multiple of kRowTile.
constexpr int64_t kRowTile = 32;
// Below this many multiply-adds (N * K * M) one thread runs the kernel: waking a second one costs
// more than it saves (and much more on a machine busy with other work). A kernel set may say more.
constexpr int64_t kSerialWork = int64_t(1) << 21;
// Up to this many tokens the AVX-512 path runs the GEMV (token pairs over L1-resident row
// sub-tiles), above it the cache-blocked GEMM, whose per-tile unpacking only pays off for more
// tokens (4096 x 4096 on Zen 4, 2 threads: GEMV faster up to 32 tokens, GEMM from 64).
constexpr int64_t kGemvMaxTokens = 32;
// A layer whose codes fit in cache (at most this many bytes) reads them from there, and a thread
// of a call split by tokens (qlinear.cpp CallSplit) unpacks all of its tiles for its share of the
// tokens.
constexpr int64_t kSmallLayerCodeBytes = int64_t(1) << 20;
// The most tokens the GEMV takes on a layer of K = 4 * K4 inputs and `code_bytes` codes (more: the
// GEMM, where a set has one; both give the same bits). Short rows are what the GEMV does worst:
// each (row, token) ends in a horizontal sum, which at K = 384 costs about a third of its
// multiplies even summed 16 rows at a time, while the GEMM's lanes are rows and need none; long
// rows are where the GEMM's unpacking costs most. Measured on Zen 4 (cpu_linear with algo "gemv"
// against "gemm", 16 layers cycled, 1 and 2 threads), the GEMM is faster from
//  - 5-6 tokens at K = 384 (384 x 384 at 8 tokens: 26 -> 21 us on one thread; the layer in cache
//    it wins from 3, but in a model the GEMM unpacks codes that other layers pushed out to L3);
//  - 9-16 at K = 512 (512 x 512, 512 -> 2048, 512 -> 8192);
//  - 12-24 at K = 768-1024 on cached layers (768 x 768, 1024 x 1024), 9-12 on a larger one
//    (896 -> 4864: 295 vs 285 us at 8 tokens, 381 vs 354 at 12, 2 threads);
//  - 24-32 and later at K >= 1536, cached or not (3072 -> 768 at 16 tokens: GEMV 236 vs GEMM 293
//    us; until session 25 a cached layer took the GEMM from 9 tokens at every K).
// (The Xeon had found the GEMM faster from 8 tokens at 1536 -> 384 too, before its AMX set took
// over all batch sizes there; AVX-512 Intel CPUs without AMX are unmeasured under this rule.)
inline int64_t gemv_max_tokens(int64_t code_bytes, int64_t K4) {
  const int64_t K = 4 * K4;
  if (K <= 384) return 4;
  if (K <= 1024) return code_bytes <= kSmallLayerCodeBytes ? (K <= 512 ? 8 : 16) : 12;
  return kGemvMaxTokens;
}

// The code bytes of group g of a row for kernels that load whole groups (NEON's, the float
// kernels); a partial last group is copied into zero-padded `tmp` (64 bytes): reading past the row
// could leave the tensor, and NEON has no masked byte loads (the AVX2 int GEMV masks its own loads
// instead: kernels_avx2.cpp load_partial). (Plain C++: compiled for the baseline in every file.)
inline const uint8_t* group_codes(const uint8_t* row, int64_t K4, int64_t g, uint8_t* tmp) {
  const int64_t left = K4 - g * kGroupCodes;
  if (left >= kGroupCodes) return row + g * kGroupCodes;
  // memcpy / memset, not a byte loop: the compiler makes them a few vector stores
  std::memcpy(tmp, row + g * kGroupCodes, left);
  std::memset(tmp + left, 0, kGroupCodes - left);
  return tmp;
}

// Table-lookup kernels (mode "lut": qlinear.cpp's lut_linear, pack.cpp's pack_lut_codes). Where
// a CPU multiplies bytes on one port only (the AVX2 EPYC: one vpmaddubsw per ~2 cycles, two per
// 32 exact products) the products can come from vpshufb instead, which other ports issue: per
// token and code byte j a table of the 16 sums  e[s] = sum_{i in s} q14[4j + i]  of the four
// activations it scales, looked up by each row's bits of its four levels (T-MAC's bit-serial
// tables, kept exact in 16 bits).
//  - q14 = lut_q14(q), the int mode's q / 4 rounded to nearest, ties to even (|q| <= kQMax, so
//    |q14| <= kQMax / 4 and every sum of four fits int16): the activations keep 14 bits, and the
//    kernels return the exact integer V = 4 * sum z * q14, which the driver scales as int mode's V
//    (every ISA gives the same bits). Ties to even, not up: the levels z are 0..3, not centred, so
//    a rounding bias of 1/8 of a step on every activation would add up over K instead of
//    averaging out (ties up: 3.5e-3 relative error at 4096 x 4096; to even: ~1e-4).
//  - codes, LUT layout: a row's code byte j (levels z_0..z_3) as two bit-plane nibbles, plane p's
//    bit i = (z_i >> p) & 1, so  sum_i z_i q14_i = e[plane 0] + 2 e[plane 1]. Rows in blocks of
//    kLutRows, each block's K4 runs of 32 bytes (block nb, code byte j at 32 * (nb * K4 + j)), byte
//    i of a run holding plane i % 2 of row ra = 16 (i / 16) + (i % 16) / 2 in its low nibble and of
//    row ra + 8 in its high nibble: the AVX2 kernel's two vectors of indices (a row's planes side
//    by side, rows 0-7 | 16-23 and 8-15 | 24-31) are then one `and` and one shift away. A last
//    block of w = N % kLutRows rows holds row r's two nibbles in byte 32 nb K4 + j w + r (plane 0
//    low), read by the portable kernel only. lut_nibble says where each nibble lies.
//  - tables, per token [K4][kLutTableBytes]: the low bytes of e[0..15], then their high bytes.
inline int lut_q14(int q) { return (q + 1 + ((q >> 2) & 1)) >> 2; }
constexpr int64_t kLutRows = 32;
constexpr int64_t kLutTableBytes = 32;
// The lut GEMVs read a block's codes as one stream and prefetch it into L2 (prefetcht1) this many
// bytes ahead, once per 64-byte line: kernel_bench on Zen 4, one token, 4096 x 11008, one thread:
// AVX2 1.01-1.24 -> 0.45-0.47 ms, AVX-512 0.96 -> 0.64; AVX2 on two threads 0.52-0.64 -> 0.33-0.35
// (4 KB ahead: 0.58-0.70 and 0.35-0.38; into L1, prefetches wait for its few miss buffers).
constexpr int64_t kLutPrefetchBytes = 8192;
// Where plane p of row n's code byte j lies in the LUT layout of an [N, K4] codes tensor: *byte,
// and *shift (0: the low nibble, 4: the high one).
inline void lut_nibble(int64_t N, int64_t K4, int64_t n, int64_t j, int p, int64_t* byte, int* shift) {
  const int64_t nb = n / kLutRows, r = n % kLutRows, base = kLutRows * nb * K4;
  if (N - nb * kLutRows < kLutRows) {  // the last, partial block
    *byte = base + j * (N - nb * kLutRows) + r;
    *shift = 4 * p;
    return;
  }
  const int64_t q = r % 16;
  *byte = base + kLutRows * j + 16 * (r / 16) + 2 * (q % 8) + p;
  *shift = q < 8 ? 0 : 4;
}
// ORs row n's code byte c (levels z0..z3, z0 in the high bits, as in the codes tensor) into its
// two nibbles of the LUT layout `dst` (zeroed first).
inline void lut_pack_byte(int64_t N, int64_t K4, int64_t n, int64_t j, uint8_t c, uint8_t* dst) {
  for (int p = 0; p < 2; ++p) {
    int nibble = 0;
    for (int i = 0; i < 4; ++i) nibble |= ((c >> (6 - 2 * i) >> p) & 1) << i;
    int64_t byte;
    int shift;
    lut_nibble(N, K4, n, j, p, &byte, &shift);
    dst[byte] = static_cast<uint8_t>(dst[byte] | nibble << shift);
  }
}
// One token's tables from its int-mode activations in the plane layout (G * 512 bytes).
using LutTables = void (*)(const int8_t* act, int64_t K4, uint8_t* tables);
void lut_tables_scalar(const int8_t* act, int64_t K4, uint8_t* tables);
void lut_tables_avx2(const int8_t* act, int64_t K4, uint8_t* tables);
void lut_tables_neon(const int8_t* act, int64_t K4, uint8_t* tables);
// IntArgs with codes in the LUT layout, act the tables (act_stride = K4 * kLutTableBytes); rows
// [n0, n1) with n0 a multiple of kLutRows, as the driver splits them (kRowTile).
void lut_gemv_scalar(const IntArgs& a, int64_t n0, int64_t n1);
void lut_gemv_avx2(const IntArgs& a, int64_t n0, int64_t n1);
void lut_gemv_avx512(const IntArgs& a, int64_t n0, int64_t n1);
void lut_gemv_neon(const IntArgs& a, int64_t n0, int64_t n1);

// Triple-lookup kernels (mode "lut3": qlinear.cpp's lut3_linear, pack.cpp's pack_lut3_codes), for
// CPUs whose byte multiplies are the bottleneck of int mode (two vpdpbusd per 64 weight-tokens on
// one port) but that permute 16-bit words from a 64-entry, two-register table in one instruction
// (AVX-512 BW's vpermi2w; VBMI2's vpshrdw cuts the 6-bit fields): three weights' levels make one
// 6-bit index, and per token and triple a table holds all 64 sums  e = sum_w (z_w - 2) * q3_w, so
// one lookup does 3 multiply-adds for each of 32 rows.
//  - q3 = lut3_q(q), the int mode's q / 18 rounded to nearest, halves away from zero (|q3| <=
//    1806; 11.8-bit activations; away from zero, not up: the levels are not centred, so a bias of
//    a half step on the ties, the same sign on every activation, would add up over K).
//  - tables, per token and triple t: the 64 sums e = sum_w (z_w - 2) * q3_w less the triple's
//    offset o_t = floor((lo + hi) / 2), lo and hi the least and greatest of them (lut3_offset), so
//    that every entry is within +-8127 (hi - lo <= 9 * 1806) and four add up in int16 before the
//    kernel widens them. (q / 32 with no offsets let four add up too, but its error reached 2.4e-3
//    on a random 300 x 1028 layer without the Hadamard transform; q / 16 with no offsets, two at a
//    time, was 5-10 % slower on Zen 4.)
//  - the kernels return the exact integer V = 18 * sum e + 18 * sum o_t + 2 * sum q: the levels'
//    mean part comes from the 16-bit q, so that the activations' rounding errors enter with the
//    weights z - 2 (mean -1/2), not z (mean 3/2): the same error in every row of a token, which
//    the latter would triple. The driver scales V as int mode's; every ISA gives the same bits.
//  - weight order: the triples run over s, the int mode's plane order with the last group's lanes
//    packed: element k = 256 g + 4 p + i is s = 256 g + P_g i + p, P_g = min(64, K4 - 64 g) (the
//    plane layout's lanes, so the tables come from it with no transpose). Triple t holds s = 3t,
//    3t+1, 3t+2 (past K: level 0), index = z_0 | z_1 << 2 | z_2 << 4; 8 triples make a chunk,
//    C = ceil(K / 24) chunks per row.
//  - codes, LUT3 layout: rows in groups of 4 blocks of 32 (N padded with zero rows to a multiple
//    of 128), per group and chunk the 4 blocks' records one after another (768 bytes), a record
//    being 3 vectors of 32 uint16 (lane = row): word 0 = t0 | t1 << 6 | t2 << 12, word 1 = t2 >> 4
//    | t3 << 2 | t4 << 8 | t5 << 14, word 2 = t5 >> 2 | t6 << 4 | t7 << 10 (t_j: the chunk's j-th
//    index), i.e. 2 bits per weight. The groups go in bands of 4 (512 rows; the last band may hold
//    fewer), and a band's chunks in ranges of 16 (the last range may hold fewer): per band and
//    range, each group's chunks of the range one after another, then the next group's. The GEMV
//    goes over a band a range at a time, each range over the band's groups, so that a range's
//    tables (16 KB a token) serve 4 groups from L1 and the band is still one stream of codes in
//    address order (Zen 4, one thread, from memory, against group after group: 11008 -> 4096 at
//    one token 426-446 -> 380-400 us, 4 tokens 1.39-1.46 -> 1.28-1.31 ms). Tensor:
//    [ceil(N / 128), C * 768] uint8.
//  - table layout, per token: kLut3HeadBytes (int64 18 * sum o_t + 2 * sum q first), then per
//    chunk and triple its 64 int16 entries, e[index], then the chunks' narrow bits (bit c % 8 of
//    byte c / 8, zero past C; lut3_narrow_bytes).
//  - narrow chunks: where each of a chunk's 8 triples has 3 (|q3_0| + |q3_1| + |q3_2|) <= 8190
//    (lut3_narrow), its entries are within +-4095 and all 8 of its lookups add up in int16
//    (32760), so that the AVX-512 GEMV widens them once, not twice: the widening (two vpdpwssd per
//    int16 sum) shares its port with the lookups (Zen 4, one thread, kernel_bench, 4096 x 4096,
//    codes in cache, 8 tokens, code vectors in registers both ways: 813-815 -> 773-786 us). With
//    the int mode's per-token scale most chunks are narrow: random normal activations 84 % at
//    K = 384, 96 % at 4096, 98 % at 11008; heavier tails more.
inline int lut3_q(int q) { return q >= 0 ? (q + 9) / 18 : -((9 - q) / 18); }
constexpr int64_t kLut3Step = 18;  // V = kLut3Step * (sum of entries) + the token's constant
// A triple's offset o_t (see above) from its three q3: each weight's least and greatest (z - 2) q
// are -2 q and q, or q and -2 q, so lo + hi = -(q0 + q1 + q2).
inline int lut3_offset(const int16_t* q3) { return -(q3[0] + q3[1] + q3[2]) >> 1; }
// Whether a triple's entries are within +-4095 (see "narrow chunks" above): they span
// hi - lo = 3 (|q3_0| + |q3_1| + |q3_2|), and the offset centres them.
constexpr int kLut3NarrowSpan = 8190;
inline bool lut3_narrow(const int16_t* q3) {
  return 3 * (std::abs(q3[0]) + std::abs(q3[1]) + std::abs(q3[2])) <= kLut3NarrowSpan;
}
// The narrow bits of a token's tables, as its builder goes over the triples t = 0, 1, ... in order.
struct Lut3NarrowBits {
  uint8_t* bits;      // the zeroed lut3_narrow_bytes after the entries
  bool chunk = true;  // the current chunk's triples so far are narrow
  void add(int64_t t, const int16_t* q3) {
    chunk = chunk && lut3_narrow(q3);
    if (t % 8 == 7) {
      if (chunk) bits[t / 64] = static_cast<uint8_t>(bits[t / 64] | 1 << (t / 8 % 8));
      chunk = true;
    }
  }
};
constexpr int64_t kLut3Rows = 128;        // rows per group of the layout
constexpr int64_t kLut3BandGroups = 4;    // groups per band
constexpr int64_t kLut3RangeChunks = 16;  // chunks per range
constexpr int64_t kLut3ChunkBytes = 768;  // one chunk of a group: 4 blocks x 3 x 32 uint16
constexpr int64_t kLut3HeadBytes = 64;
constexpr int64_t kLut3TableBytes = 1024;  // per chunk: 8 triples x 64 int16
// The lut3 GEMV with several tokens goes over spans of this many rows one range of K at a time
// (kernels_lut3_avx512.cpp); the driver gives it at least one span per call where it can.
constexpr int64_t kLut3SpanRows = 2048;
// The rows a lut3 GEMV call starts on (the driver's calls, kernel_bench's threads): a band where
// each of `threads` threads still gets one (a band's codes are one stream), else a group: a call
// on part of a band reads its groups' pieces of each range, and the codes it prefetches ahead are
// the other groups' (4096 x 4096, one token, 2 threads, calls on 2 groups: 0.82x int mode).
inline int64_t lut3_call_rows(int64_t N, int64_t threads) {
  return N >= threads * kLut3BandGroups * kLut3Rows ? kLut3BandGroups * kLut3Rows : kLut3Rows;
}
inline int64_t lut3_chunks(int64_t K4) { return (4 * K4 + 23) / 24; }
inline int64_t lut3_groups(int64_t N) { return (N + kLut3Rows - 1) / kLut3Rows; }
// the narrow bits' bytes after a token's entries (whole 64-byte lines: the tables stay aligned)
inline int64_t lut3_narrow_bytes(int64_t C) { return (C + 511) / 512 * 64; }
inline uint8_t* lut3_narrow_bits(uint8_t* tables, int64_t C) { return tables + kLut3HeadBytes + C * kLut3TableBytes; }
inline const uint8_t* lut3_narrow_bits(const uint8_t* tables, int64_t C) {
  return tables + kLut3HeadBytes + C * kLut3TableBytes;
}
inline int64_t lut3_table_stride(int64_t K4) {
  const int64_t C = lut3_chunks(K4);
  return kLut3HeadBytes + C * kLut3TableBytes + lut3_narrow_bytes(C);
}
// Mode lut3 runs its GEMV past gemv_max_tokens on rows of K >= kLut3LongRow while a call's tables
// (every worker makes them for all the call's tokens) stay within kLut3GemvTableBytes, and the int
// GEMM on its 12-bit activations past that: there the lookups beat the GEMM, but a worker's tables
// for many long rows cost more to make and stream than they save (Zen 4, lut3_bench.py, lut3 x int
// mode, GEMM -> GEMV: 4096 -> 4096 and 11008 -> 4096 at 64-128 tokens, one thread 0.99-1.01 ->
// 1.13-1.19, two 1.00-1.05; but 11008 -> 4096 at 128 tokens, 60 MB of tables a worker, two threads
// 0.46). Shorter rows keep int mode's count: there int mode's GEMM is the faster from it (session
// 28, lut3 GEMV x int GEMM at 16-128 tokens: 384 x 384 0.71-0.89, 1536 -> 384 0.79-1.00, 384 ->
// 1536 0.88-1.13; MiniLM at 128 tokens, 2 threads, lut3 1.24-1.30x fp32 against int mode's
// 1.74-1.79x; 4096 x 4096 at 16-64 tokens 1.02-1.47).
constexpr int64_t kLut3GemvTableBytes = 16 << 20, kLut3LongRow = 4096;
inline int64_t lut3_gemv_max_tokens(int64_t code_bytes, int64_t K4) {
  const int64_t most = gemv_max_tokens(code_bytes, K4);
  if (4 * K4 < kLut3LongRow) return most;
  const int64_t fit = kLut3GemvTableBytes / lut3_table_stride(K4);
  return fit > most ? fit : most;
}
// Element k of s (see above), or -1 past K.
inline int64_t lut3_element(int64_t K4, int64_t s) {
  if (s >= 4 * K4) return -1;
  const int64_t g = s / 256, r = s % 256, P = K4 - 64 * g < 64 ? K4 - 64 * g : 64;
  return 256 * g + 4 * (r % P) + r / P;
}
// Where triple j (0-7) of a chunk lies in the record's three words: its bits from bit
// kLut3Bit[j] of word kLut3Word[j] up; the bits that word cannot hold in the next one from bit 0.
constexpr int kLut3Word[8] = {0, 0, 0, 1, 1, 1, 2, 2}, kLut3Bit[8] = {0, 6, 12, 2, 8, 14, 4, 10};
inline void lut3_place(int j, uint32_t index, uint16_t* words) {
  const uint32_t v = index << kLut3Bit[j];
  words[kLut3Word[j]] = static_cast<uint16_t>(words[kLut3Word[j]] | (v & 0xFFFF));
  if (v >> 16) words[kLut3Word[j] + 1] = static_cast<uint16_t>(words[kLut3Word[j] + 1] | (v >> 16));
}
// Row n's word 0 of chunk c in an [N, K4] layer's LUT3 layout of C chunks per row (words 1 and 2
// follow 32 and 64 uint16 later).
inline int64_t lut3_word(int64_t n, int64_t N, int64_t C, int64_t c) {
  const int64_t group = n / kLut3Rows, band = group / kLut3BandGroups, in_band = group % kLut3BandGroups;
  const int64_t band_groups = std::min(kLut3BandGroups, lut3_groups(N) - kLut3BandGroups * band);
  const int64_t range = c / kLut3RangeChunks, range_chunks = std::min(kLut3RangeChunks, C - kLut3RangeChunks * range);
  const int64_t chunk = kLut3BandGroups * band * C + kLut3RangeChunks * range * band_groups +
                        in_band * range_chunks + c % kLut3RangeChunks;
  return chunk * (kLut3ChunkBytes / 2) + (n % kLut3Rows) / 32 * 96 + n % 32;
}
// The three words of one row's chunk from its code bytes `row`; element[0, 24): the chunk's
// lut3_element of each s (-1 past K).
inline void lut3_chunk_words(const uint8_t* row, const int64_t* element, uint16_t* words) {
  words[0] = words[1] = words[2] = 0;
  for (int j = 0; j < 8; ++j) {
    uint32_t index = 0;
    for (int w = 0; w < 3; ++w) {
      const int64_t k = element[3 * j + w];
      if (k >= 0) index |= static_cast<uint32_t>((row[k / 4] >> (6 - 2 * (k % 4))) & 3) << (2 * w);
    }
    lut3_place(j, index, words);
  }
}
inline uint32_t lut3_index(int j, const uint16_t* words) {
  uint32_t v = words[kLut3Word[j]] >> kLut3Bit[j];
  if (kLut3Bit[j] > 10) v |= static_cast<uint32_t>(words[kLut3Word[j] + 1]) << (16 - kLut3Bit[j]);
  return v & 63;
}
// One token's tables from its int-mode activations in the plane layout (G * 512 bytes).
void lut3_tables_scalar(const int8_t* act, int64_t K4, uint8_t* tables);
void lut3_tables_avx512(const int8_t* act, int64_t K4, uint8_t* tables);
// IntArgs with codes in the LUT3 layout, act the tables (act_stride = lut3_table_stride(K4));
// rows [n0, n1), n0 a multiple of 32 (kRowTile), n1 a multiple of 32 or N.
void lut3_gemv_scalar(const IntArgs& a, int64_t n0, int64_t n1);
void lut3_gemv_avx512(const IntArgs& a, int64_t n0, int64_t n1);
// Mode lut3 past the GEMV's token count (qlinear.cpp): one token's int-mode activations in the
// natural layout (`chunks` of 8 bytes, a multiple of 8: its G * 64) cut in place to q3, again as hi and lo bytes
// (|q3| <= 1806: hi = (q3 + 128) >> 8 in [-7, 7], lo the low byte), for the int GEMM. Returns the
// token's constant 2 * sum q - 2 * kLut3Step * sum q3, so that kLut3Step * (the GEMM's dot product)
// + constant is the lut3 GEMV's V.
using Lut3Requantize = int64_t (*)(int8_t* act, int64_t chunks);
int64_t lut3_requantize_scalar(int8_t* act, int64_t chunks);
int64_t lut3_requantize_avx512(int8_t* act, int64_t chunks);

void int_plane_scalar(const IntArgs& a, int64_t n0, int64_t n1);
void float_plane_scalar(const FloatArgs& a, int64_t n0, int64_t n1);

void int_plane_avx2(const IntArgs& a, int64_t n0, int64_t n1);
void float_plane_avx2(const FloatArgs& a, int64_t n0, int64_t n1);

void int_plane_avx512(const IntArgs& a, int64_t n0, int64_t n1);
void int_gemm_avx512(const IntArgs& a, int64_t n0, int64_t n1);  // natural layout, M > kGemvMaxTokens
void float_plane_avx512(const FloatArgs& a, int64_t n0, int64_t n1);

void int_plane_amx(const IntArgs& a, int64_t n0, int64_t n1);  // plane layout, every batch size
int64_t amx_serial_work(int64_t M);  // kSerialWork for the tile kernel at M tokens (kernel_table.h)
// The tile kernel's operands from the activations (plane layout), made by the driver once per
// layer call, 16 tokens at a time as each thread finishes encoding them, instead of by every
// row range the rows are split into: amx_packed_bytes(M, G) bytes for M tokens (0 below the
// kernel's minimum token count, where it runs the GEMV; up to 8 tokens one block in the narrow
// layout, which depends on M); amx_pack_tokens writes tokens
// [m0, m0 + mt) (m0 a multiple of kPackTokenBlock, mt <= kPackTokenBlock) into `packed`.
constexpr int64_t kPackTokenBlock = 16;
int64_t amx_packed_bytes(int64_t M, int64_t G);
void amx_pack_tokens(const IntArgs& a, int64_t m0, int64_t mt, uint8_t* packed);

void int_plane_neon(const IntArgs& a, int64_t n0, int64_t n1);
void float_plane_neon(const FloatArgs& a, int64_t n0, int64_t n1);

}  // namespace cpu
}  // namespace pyquant
