// AMX kernel (AMX-TILE and AMX-INT8 with AVX-512 VNNI and GFNI: Sapphire Rapids and later Xeons).
// Only called after kernel_table.cpp has checked the CPU and obtained the OS's permission to use
// the tile registers; compiled for that ISA with a target pragma like kernels_avx512.cpp.
//
// One int kernel for every batch size, plane layout (kernel_api.h). A tile multiply (tdpbusd)
// computes C[r][c] += sum_p A[r][p] * B[p/4][4c + p%4] for 16 x 64 unsigned bytes A and 16 x 64
// signed bytes B: 16 rows x 16 tokens x 64 weights, 16384 multiply-adds per instruction, where
// vpdpbusd does 64. Per group g (code bytes 64g .. 64g+63 of a row) and level plane i:
//  - A = 16 rows' level i of the group's 64 code bytes, one byte per weight: cut out of the codes
//    (one GFNI affine byte transform per plane) into a small buffer the tile is loaded from;
//  - B = 16 tokens' plane i of group g (hi or lo), transposed as 16 x 16 dwords so that B[q][4c + j]
//    is byte 4q + j of token c's plane: A's byte p meets the activation it multiplies. The
//    activations are transposed once per call, not per row tile.
// hi and lo get their own accumulators, combined as 256 * hi + lo on store (transposed back to
// token-major), so the result is the same exact integer as every other kernel's.
// From 3 to 8 tokens (`narrow`) hi and lo are columns of one B tile instead of two tiles: column
// 2t + s is token t's hi (s = 0) or lo (s = 1), so a row tile takes 2 tile multiplies per plane
// and group instead of 4 (4096 x 1024 from cache, 1 thread: 8 tokens 127 us, the AVX-512 GEMV
// 326 us; 4096 x 4096, 2 threads, 8 tokens: 2.05x the GEMV, session 9's 16-token layout 1.70x).
// One or two tokens keep the AVX-512 GEMV: cutting the levels (4 bytes stored and tile-loaded per
// code byte) costs what its vpdpbusd do (75 vs 69 us at one token, 82 vs 85 at two; from memory
// on 2 threads the GEMV is ahead at both).
#include <cstdint>
#include <cstdlib>

#include "kernel_api.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,gfni,amx-tile,amx-int8")

#include <immintrin.h>

#include "avx512_common.h"

namespace pyquant {
namespace cpu {
namespace {

constexpr int kTokenBlock = 16;        // columns of the B and C tiles
// Fewer tokens run the AVX-512 GEMV; up to kNarrowMaxTokens the narrow layout (hi and lo as
// columns: 2 per token), above it blocks of 16 tokens.
constexpr int64_t kMinTokens = 3;
constexpr int64_t kNarrowMaxTokens = 8;
constexpr int64_t kRowTileAmx = 32;    // two A tiles share every B tile
constexpr int64_t kTileBytes = 1024;   // one tile: 16 rows x 64 bytes
constexpr int64_t kGroupTiles = 8;     // per group: 4 planes x (2 A tiles | hi and lo B tiles)
// Token blocks per pass over the row tiles: their transposed activations (8 KB per group and
// block) stay in L2 while the thread's row tiles go by.
constexpr int64_t kActPassBytes = 1024 << 10;

// Tiles: 0-3 accumulators (hi and lo of rows 0-15, then of rows 16-31), 4-5 A (rows 0-15,
// 16-31), 6-7 B (hi, lo). Every tile is 16 x 64 bytes: a block of fewer than 16 tokens has zero
// columns (cheaper than reconfiguring the tiles per block).
struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  alignas(64) TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// Field i of every byte (z_i = c >> (6 - 2i) & 3): one GF(2) affine transform whose matrix routes
// bits 6-2i and 7-2i to bits 0 and 1 (qword byte 7 - b selects the inputs of output bit b).
template <int I>
inline __m512i level_field(__m512i c) {
  if constexpr (I == 3) {
    return _mm512_and_si512(c, _mm512_set1_epi8(3));
  } else {
    constexpr int s = 6 - 2 * I;
    const __m512i m = _mm512_set1_epi64(static_cast<long long>((uint64_t(1) << s) << 56 | (uint64_t(1) << (s + 1)) << 48));
    return _mm512_gf2p8affine_epi64_epi8(c, m, 0);
  }
}

// Tile planes of group g. A last group of at most 32 code bytes (K = 384: 96 code bytes a row)
// holds two level planes per tile, side by side: bytes 0-31 of tile plane j are plane 2j of its
// code bytes, bytes 32-63 plane 2j + 1, and the activation tiles pair up the same way. Its
// multiplies, cuts and tile loads halve: 384 x 384 at 32 tokens, one thread, 29k -> 22k TSC per
// call; at one token block (16 or fewer) no faster, the cuts, the multiplies and the stores of a
// row tile then running one after the other whatever their number.
inline int tile_planes(const IntArgs& a, int64_t g) {
  return g == a.G - 1 && a.K4 - g * kGroupCodes <= 32 ? 2 : 4;
}

// The 64 activation bytes that meet tile plane i: plane i of the group's 64 code bytes, or for a
// paired group planes 2i and 2i + 1 of the first 32; `p` is the group's 4 planes (64 bytes each).
inline __m512i tile_plane(const int8_t* p, int i, bool paired) {
  if (!paired) return _mm512_loadu_si512(p + 64 * i);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 * i))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 * i + 64)), 1);
}

// A tiles of group g for rows [t0, t0 + rows) (rows <= 32; missing rows are level 0): tile
// (i * 2 + h) of `dst` holds tile plane i (tile_planes) of rows 16h .. 16h + 15.
// The codes of the next row tile (32 rows, contiguous) are prefetched meanwhile, 32 lines per
// group: the tile reads 32 short row segments at a time, too many streams for the hardware
// prefetchers to follow from memory. Into L2, not L1: the next tile's 32 KB (at K = 4096) would
// push this tile's codes and levels out of L1 (4096 x 4096 from memory, 2 threads: 4 tokens
// 0.33 -> 0.29 ms, 8 tokens 0.375 -> 0.345; 32 and 128 tokens unchanged).
void cut_levels(const IntArgs& a, int64_t t0, int64_t rows, int64_t g, uint8_t* dst) {
  const __mmask64 mask = group_mask(a.K4, g);
  const bool paired = tile_planes(a, g) == 2;
  // (past the last tile this points beyond the codes: harmless, a prefetch never faults)
  const uint8_t* next = a.codes + (t0 + kRowTileAmx) * a.K4 + g * kRowTileAmx * 64;
#pragma GCC unroll 2
  for (int64_t r = 0; r < kRowTileAmx; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(next + 64 * r), _MM_HINT_T1);
    const __m512i c = r < rows ? _mm512_maskz_loadu_epi8(mask, a.codes + (t0 + r) * a.K4 + g * kGroupCodes)
                               : _mm512_setzero_si512();
    uint8_t* p = dst + (r / 16) * kTileBytes + (r % 16) * 64;
    if (paired) {  // (the code bytes past 32 are masked off: their levels are not needed)
      _mm512_store_si512(p, _mm512_inserti64x4(level_field<0>(c), _mm512_castsi512_si256(level_field<1>(c)), 1));
      _mm512_store_si512(p + 2 * kTileBytes,
                         _mm512_inserti64x4(level_field<2>(c), _mm512_castsi512_si256(level_field<3>(c)), 1));
      continue;
    }
    _mm512_store_si512(p + 0 * 2 * kTileBytes, level_field<0>(c));
    _mm512_store_si512(p + 1 * 2 * kTileBytes, level_field<1>(c));
    _mm512_store_si512(p + 2 * 2 * kTileBytes, level_field<2>(c));
    _mm512_store_si512(p + 3 * 2 * kTileBytes, level_field<3>(c));
  }
}

// B tiles of tokens [m0, m0 + mt) (mt <= 16; missing tokens are zero): tile (g * 4 + i) * 2 + s
// of `dst` holds tile plane i of group g, hi (s = 0) or lo (s = 1), transposed.
void transpose_tokens(const IntArgs& a, int64_t m0, int64_t mt, uint8_t* dst) {
  for (int64_t g = 0; g < a.G; ++g) {
    const int planes = tile_planes(a, g);
    for (int i = 0; i < planes; ++i)
      for (int s = 0; s < 2; ++s) {
        __m512i v[16];
        for (int t = 0; t < 16; ++t)
          v[t] = t < mt ? tile_plane(a.act + (m0 + t) * a.act_stride + g * 512 + s * 256, i, planes == 2)
                        : _mm512_setzero_si512();
        transpose16(v);  // v[q] lane t: bytes 4q .. 4q + 3 of token t's plane
        uint8_t* p = dst + ((g * 4 + i) * 2 + s) * kTileBytes;
        for (int q = 0; q < 16; ++q) _mm512_store_si512(p + 64 * q, v[q]);
      }
  }
}

// C += the products of group g: A tiles from `levels` (cut_levels' layout), B tiles of the group
// from `tokens` (transpose_tokens' layout).
inline void multiply_group(const uint8_t* levels, const uint8_t* tokens, int planes) {
#pragma GCC unroll 4
  for (int i = 0; i < planes; ++i) {
    _tile_loadd(4, levels + (2 * i) * kTileBytes, 64);
    _tile_loadd(5, levels + (2 * i + 1) * kTileBytes, 64);
    _tile_loadd(6, tokens + (2 * i) * kTileBytes, 64);
    _tile_loadd(7, tokens + (2 * i + 1) * kTileBytes, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
}

// Writes V = 256 hi + lo of the accumulators for tokens [m0, m0 + mt) x rows [t0, t0 + rows).
void store_tiles(const IntArgs& a, int64_t m0, int64_t mt, int64_t t0, int64_t rows) {
  alignas(64) int32_t c[4][16][16];  // [hi0, lo0, hi1, lo1][row][token]
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
  for (int h = 0; h < 2 && 16 * h < rows; ++h) {
    const int valid = static_cast<int>(imin(16, rows - 16 * h));
    const int64_t n = t0 + 16 * h;
    if (!a.out32) {  // K > kInt32MaxK: 256 hi + lo needs 64 bits
      for (int64_t t = 0; t < mt; ++t)
        for (int r = 0; r < valid; ++r) a.out64[(m0 + t) * a.N + n + r] = 256 * int64_t(c[2 * h][r][t]) + c[2 * h + 1][r][t];
      continue;
    }
    __m512i v[16];
    for (int r = 0; r < 16; ++r)
      v[r] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c[2 * h][r]), 8), _mm512_load_si512(c[2 * h + 1][r]));
    transpose16(v);  // v[t] lane r
    const __mmask16 mask = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    for (int64_t t = 0; t < mt; ++t) _mm512_mask_storeu_epi32(a.out32 + (m0 + t) * a.N + n, mask, v[t]);
  }
}

inline void save_accumulators(uint8_t* p) {
  _tile_stored(0, p, 64);
  _tile_stored(1, p + kTileBytes, 64);
  _tile_stored(2, p + 2 * kTileBytes, 64);
  _tile_stored(3, p + 3 * kTileBytes, 64);
}

inline void load_accumulators(const uint8_t* p) {
  _tile_loadd(0, p, 64);
  _tile_loadd(1, p + kTileBytes, 64);
  _tile_loadd(2, p + 2 * kTileBytes, 64);
  _tile_loadd(3, p + 3 * kTileBytes, 64);
}

inline void zero_accumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// ------------------------------------------------------------------ narrow: 3 .. 8 tokens

// Tiles: 0-1 accumulators (rows 0-15, 16-31; column 2t + s), 4-5 A as in the wide layout, 6 B
// (16 dword rows x 2M columns: a tile of fewer columns loads and stores fewer bytes).
void configure_narrow(int64_t M) {
  alignas(64) TileConfig c = {};
  c.palette = 1;
  const uint16_t cols = static_cast<uint16_t>(8 * M);  // 2M int32 / dword columns
  const int narrow_tiles[] = {0, 1, 6}, a_tiles[] = {4, 5};
  for (int t : narrow_tiles) c.colsb[t] = cols;
  for (int t : a_tiles) c.colsb[t] = 64;
  for (int t = 0; t < 8; ++t) c.rows[t] = c.colsb[t] ? 16 : 0;
  _tile_loadconfig(&c);
}

inline int64_t narrow_tile_bytes(int64_t M) { return 16 * 8 * M; }

// B tiles of all M tokens: tile g * 4 + i of `dst` (narrow_tile_bytes(M) each) holds tile plane i of
// group g with B[q][4c + j] = byte 4q + j of column c's 64 bytes (c = 2t + s: token t, hi or lo).
void narrow_tokens(const IntArgs& a, uint8_t* dst) {
  const int64_t cols = 2 * a.M, row_bytes = 8 * a.M;
  const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
  for (int64_t g = 0; g < a.G; ++g) {
    const int planes = tile_planes(a, g);
    for (int i = 0; i < planes; ++i) {
      __m512i v[16];
      for (int c = 0; c < 16; ++c)
        v[c] = c < cols ? tile_plane(a.act + (c / 2) * a.act_stride + g * 512 + (c % 2) * 256, i, planes == 2)
                        : _mm512_setzero_si512();
      transpose16(v);  // v[q] lane c: bytes 4q .. 4q + 3 of column c
      uint8_t* p = dst + (g * 4 + i) * narrow_tile_bytes(a.M);
      for (int q = 0; q < 16; ++q) _mm512_mask_storeu_epi32(p + q * row_bytes, keep, v[q]);
    }
  }
}

// Writes V = 256 hi + lo of the two accumulators for rows [t0, t0 + rows): each 16-row half
// transposed in registers to a vector per column (hi or lo of one token over the 16 rows), so a
// token's 16 outputs are one store (one element at a time, this took 16 % of the kernel's time at
// 4 tokens and K = 4096, more at small K).
void store_narrow(const IntArgs& a, int64_t t0, int64_t rows) {
  alignas(64) int32_t c[2][16][16];  // [row half][row][column 2t + s]; columns from 2M on unused
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  for (int h = 0; h < 2 && 16 * h < rows; ++h) {
    const int valid = static_cast<int>(imin(16, rows - 16 * h));
    const int64_t n = t0 + 16 * h;
    if (!a.out32) {  // K > kInt32MaxK: 256 hi + lo needs 64 bits
      for (int r = 0; r < valid; ++r)
        for (int64_t t = 0; t < a.M; ++t) a.out64[t * a.N + n + r] = 256 * int64_t(c[h][r][2 * t]) + c[h][r][2 * t + 1];
      continue;
    }
    __m512i v[16];
    for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(c[h][r]);
    transpose16(v);  // v[2t + s] lane r
    const __mmask16 mask = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    for (int64_t t = 0; t < a.M; ++t)
      _mm512_mask_storeu_epi32(a.out32 + t * a.N + n, mask,
                               _mm512_add_epi32(_mm512_slli_epi32(v[2 * t], 8), v[2 * t + 1]));
  }
}

void int_plane_amx_narrow(const IntArgs& a, int64_t n0, int64_t n1, uint8_t* scratch) {
  const int64_t group_bytes = kGroupTiles * kTileBytes, tile = narrow_tile_bytes(a.M);
  const uint8_t* tokens = a.packed;
  uint8_t* levels = scratch;
  if (!tokens) {
    narrow_tokens(a, scratch + 2 * group_bytes);
    tokens = scratch + 2 * group_bytes;
  }
  configure_narrow(a.M);
  for (int64_t t0 = n0; t0 < n1; t0 += kRowTileAmx) {
    const int64_t rows = imin(kRowTileAmx, n1 - t0);
    cut_levels(a, t0, rows, 0, levels);
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t g = 0; g < a.G; ++g) {
      if (g + 1 < a.G) cut_levels(a, t0, rows, g + 1, levels + ((g + 1) & 1) * group_bytes);
      const uint8_t* lv = levels + (g & 1) * group_bytes;
      const int planes = tile_planes(a, g);
#pragma GCC unroll 4
      for (int i = 0; i < planes; ++i) {
        _tile_loadd(4, lv + (2 * i) * kTileBytes, 64);
        _tile_loadd(5, lv + (2 * i + 1) * kTileBytes, 64);
        _tile_loadd(6, tokens + (g * 4 + i) * tile, 8 * a.M);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 5, 6);
      }
    }
    store_narrow(a, t0, rows);
  }
  _tile_release();
}

// This thread's buffers (transposed activations, cut levels), grown on demand and kept: they
// are the kernel's working memory, not something to allocate per call.
struct Scratch {
  uint8_t* p = nullptr;
  int64_t bytes = 0;
  ~Scratch() { std::free(p); }
  uint8_t* get(int64_t need) {
    if (need > bytes) {
      std::free(p);
      p = static_cast<uint8_t*>(std::aligned_alloc(64, need));
      bytes = p ? need : 0;
    }
    return p;
  }
};
thread_local Scratch t_scratch;

}  // namespace

// The tile path does several times the GEMV's multiply-adds per microsecond, so a second thread
// pays off only at more of them: measured (Xeon, 2 threads, 384 x 384 .. 1536 x 384 layers) 0.85x
// at 9.4M, 1.0-1.2x at 17M, 1.26x at 19M multiply-adds.
int64_t amx_serial_work(int64_t M) { return M >= kMinTokens ? int64_t(1) << 24 : kSerialWork; }

int64_t amx_packed_bytes(int64_t M, int64_t G) {
  if (M < kMinTokens) return 0;
  if (M <= kNarrowMaxTokens) return G * 4 * narrow_tile_bytes(M);
  return (M + kTokenBlock - 1) / kTokenBlock * G * kGroupTiles * kTileBytes;
}

void amx_pack_tokens(const IntArgs& a, int64_t m0, int64_t mt, uint8_t* packed) {
  if (a.M <= kNarrowMaxTokens) narrow_tokens(a, packed);  // (one block: m0 = 0, mt = M)
  else transpose_tokens(a, m0, mt, packed + m0 / kTokenBlock * a.G * kGroupTiles * kTileBytes);
}

void int_plane_amx(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t group_bytes = kGroupTiles * kTileBytes;
  if (a.M < kMinTokens) {
    int_plane_avx512(a, n0, n1);
    return;
  }
  if (a.M <= kNarrowMaxTokens) {  // levels of two groups | (unless packed) the B tiles
    uint8_t* scratch = t_scratch.get(2 * group_bytes + (a.packed ? 0 : a.G * 4 * narrow_tile_bytes(a.M)));
    if (scratch) int_plane_amx_narrow(a, n0, n1, scratch);
    else int_plane_avx512(a, n0, n1);  // no memory for the buffers
    return;
  }
  const int64_t blocks = (a.M + kTokenBlock - 1) / kTokenBlock;
  const int64_t pass = imin(blocks, 1 + kActPassBytes / (a.G * group_bytes));  // token blocks per pass
  // [pass][G] transposed token groups (unless packed already) | levels of two groups | [pass] accumulator spills
  const int64_t token_bytes = a.packed ? 0 : pass * a.G * group_bytes, spill_bytes = pass * 4 * kTileBytes;
  uint8_t* scratch = t_scratch.get(token_bytes + 2 * group_bytes + spill_bytes);
  if (!scratch) {  // no memory for the buffers: the AVX-512 GEMV
    int_plane_avx512(a, n0, n1);
    return;
  }
  uint8_t* const levels = scratch + token_bytes;
  uint8_t* const spill = levels + 2 * group_bytes;
  configure_tiles();
  for (int64_t b0 = 0; b0 < blocks; b0 += pass) {
    const int64_t nb = imin(blocks, b0 + pass) - b0;
    const uint8_t* tokens = a.packed ? a.packed + b0 * a.G * group_bytes : scratch;
    for (int64_t b = 0; b < nb && !a.packed; ++b) {
      const int64_t m = (b0 + b) * kTokenBlock;
      transpose_tokens(a, m, imin(kTokenBlock, a.M - m), scratch + b * a.G * group_bytes);
    }
    // The levels are cut one group at a time, double-buffered so that the tile loads of group g
    // do not wait for the stores of group g + 1. One block keeps its accumulators in the tiles;
    // several take turns on each group, spilling their four accumulators (4 KB) in between.
    for (int64_t t0 = n0; t0 < n1; t0 += kRowTileAmx) {
      const int64_t rows = imin(kRowTileAmx, n1 - t0);
      cut_levels(a, t0, rows, 0, levels);
      for (int64_t g = 0; g < a.G; ++g) {
        if (g + 1 < a.G) cut_levels(a, t0, rows, g + 1, levels + ((g + 1) & 1) * group_bytes);
        for (int64_t b = 0; b < nb; ++b) {
          if (g == 0) zero_accumulators();
          else if (nb > 1) load_accumulators(spill + b * 4 * kTileBytes);
          multiply_group(levels + (g & 1) * group_bytes, tokens + (b * a.G + g) * group_bytes, tile_planes(a, g));
          if (g + 1 == a.G) {
            const int64_t m = (b0 + b) * kTokenBlock;
            store_tiles(a, m, imin(kTokenBlock, a.M - m), t0, rows);
          } else if (nb > 1) {
            save_accumulators(spill + b * 4 * kTileBytes);
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace cpu
}  // namespace pyquant

#pragma GCC pop_options
