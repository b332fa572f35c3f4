// NEON (Advanced SIMD) kernels for AArch64, with ARMv8.0 instructions only, so they run on every
// AArch64 CPU (Apple silicon, Graviton, Ampere, Raspberry Pi 4 and later). Same plane layout and
// same exact integers as the x86 kernels (kernel_api.h). Int mode: the u8 x s8 products go
// through vmull_s8 / vmlal_s8 (int16: the four planes sum to at most 4 * 3 * 128 = 1536) and
// vpadalq_s16 widens pairs into int32 lanes (at most 24576 per lane and group, folded into int64
// every kBlockGroups groups). Float mode: fp32 FMAs over the same planes. Mode "lut": the AVX2
// LUT kernel's scheme (kernel_api.h) with `tbl` lookups, below (lut_half).
// Measured only under qemu (correctness, not speed): no AArch64 machine has run them.
#include <arm_neon.h>

#include "kernel_api.h"

namespace pyquant {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows per block: each group of activations is loaded once for 4 rows

// The four 2-bit fields of 16 code bytes as int8 levels 0..3 (z0 in the two high bits).
inline void levels(uint8x16_t c, int8x16_t z[4]) {
  const uint8x16_t three = vdupq_n_u8(3);
  z[0] = vreinterpretq_s8_u8(vshrq_n_u8(c, 6));
  z[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(c, 4), three));
  z[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(c, 2), three));
  z[3] = vreinterpretq_s8_u8(vandq_u8(c, three));
}

// sum over the 4 planes of z_i * x_i, 16 lanes, into pairs of int32 lanes of acc.
inline int32x4_t dot4(int32x4_t acc, const int8x16_t z[4], const int8x16_t x[4]) {
  int16x8_t lo = vmull_s8(vget_low_s8(z[0]), vget_low_s8(x[0]));
  int16x8_t hi = vmull_high_s8(z[0], x[0]);
  for (int i = 1; i < 4; ++i) {
    lo = vmlal_s8(lo, vget_low_s8(z[i]), vget_low_s8(x[i]));
    hi = vmlal_high_s8(hi, z[i], x[i]);
  }
  return vpadalq_s16(vpadalq_s16(acc, lo), hi);
}

template <int R>
void int_block(const IntArgs& a, int64_t n, int64_t m) {
  const int8_t* act = a.act + m * a.act_stride;
  alignas(16) uint8_t tmp[R][kGroupCodes];
  int64_t total_hi[R] = {}, total_lo[R] = {};
  for (int64_t g0 = 0; g0 < a.G; g0 += kBlockGroups) {
    int32x4_t hi[R], lo[R];
    for (int r = 0; r < R; ++r) hi[r] = lo[r] = vdupq_n_s32(0);
    for (int64_t g = g0; g < imin(a.G, g0 + kBlockGroups); ++g) {
      const int8_t* ah = act + g * 512;
      const uint8_t* rows[R];
      for (int r = 0; r < R; ++r) rows[r] = group_codes(a.codes + (n + r) * a.K4, a.K4, g, tmp[r]);
      // the quarters holding code bytes (a partial last group's others multiply zero activations)
      const int64_t quarters = imin(4, (a.K4 - g * kGroupCodes + 15) / 16);
      for (int q = 0; q < quarters; ++q) {  // lanes 16q .. 16q + 15 of each plane
        int8x16_t xh[4], xl[4];
        for (int i = 0; i < 4; ++i) {
          xh[i] = vld1q_s8(ah + i * 64 + 16 * q);
          xl[i] = vld1q_s8(ah + 256 + i * 64 + 16 * q);
        }
        for (int r = 0; r < R; ++r) {
          int8x16_t z[4];
          levels(vld1q_u8(rows[r] + 16 * q), z);
          hi[r] = dot4(hi[r], z, xh);
          lo[r] = dot4(lo[r], z, xl);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      total_hi[r] += vaddlvq_s32(hi[r]);
      total_lo[r] += vaddlvq_s32(lo[r]);
    }
  }
  for (int r = 0; r < R; ++r) a.store(m, n + r, 256 * total_hi[r] + total_lo[r]);
}

void float_row(const FloatArgs& a, int64_t n, int64_t m) {
  const float* act = a.act + m * a.G * kGroupElems;
  alignas(16) uint8_t tmp[kGroupCodes];
  float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
  for (int64_t g = 0; g < a.G; ++g) {
    const uint8_t* codes = group_codes(a.codes + n * a.K4, a.K4, g, tmp);
    const float* ag = act + g * kGroupElems;
    for (int q = 0; q < 4; ++q) {
      int8x16_t z[4];
      levels(vld1q_u8(codes + 16 * q), z);
      for (int i = 0; i < 4; ++i) {
        const uint16x8_t w0 = vmovl_u8(vget_low_u8(vreinterpretq_u8_s8(z[i])));
        const uint16x8_t w1 = vmovl_high_u8(vreinterpretq_u8_s8(z[i]));
        const uint32x4_t w[4] = {vmovl_u16(vget_low_u16(w0)), vmovl_high_u16(w0), vmovl_u16(vget_low_u16(w1)),
                                 vmovl_high_u16(w1)};
        for (int j = 0; j < 4; ++j)
          acc[j] = vfmaq_f32(acc[j], vcvtq_f32_u32(w[j]), vld1q_f32(ag + i * 64 + 16 * q + 4 * j));
      }
    }
  }
  a.out[m * a.N + n] = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
}

// LUT GEMV (kernel_api.h's table-lookup kernels) on one half of a full block: rows 16h .. 16h+15
// of block nb, MT tokens. Per code byte j the half's 16 bytes give, by an `and` and a byte shift,
// the indices of rows 0-7 and 8-15 (a row's two planes in neighbouring bytes); per token `tbl`
// looks up the low and the high bytes of the entries, and vmlal by bytes [1, 2] folds plane 0 + 2
// x plane 1 as it widens into 16-bit lanes (lane 2k: row k's plane 0, lane 2k+1: 2 x its plane 1):
// low bytes (unsigned) at most 510 per lane and code byte, high bytes (signed) |.| <= 256, so 64
// code bytes (32640, 16384) stay inside uint16 / int16; vpadal then sums each row's two lanes into
// 32 bits, and 32-bit sums (|.| <= 765 per code byte and row) fold into int64 every kLutFold.
// Per 64 products and token: 4 lookups, 8 multiply-accumulates, against 16 byte multiplies and
// the level unpacking of the int GEMV.
constexpr int64_t kLutWiden = 64;
constexpr int64_t kLutFold = 1 << 20;

template <int MT>
void lut_half(const IntArgs& a, int64_t nb, int h, int64_t m0) {
  const uint8x16_t low4 = vdupq_n_u8(0x0f);
  const uint8x8_t w_u = vreinterpret_u8_u16(vdup_n_u16(0x0201));  // bytes [1, 2]
  const int8x8_t w_s = vreinterpret_s8_u16(vdup_n_u16(0x0201));
  const uint8_t* codes = a.codes + nb * kLutRows * a.K4 + 16 * h;
  const uint8_t* tables[MT];
  for (int t = 0; t < MT; ++t) tables[t] = reinterpret_cast<const uint8_t*>(a.act + (m0 + t) * a.act_stride);
  int64_t total[MT][16] = {};
  for (int64_t f0 = 0; f0 < a.K4; f0 += kLutFold) {
    const int64_t f1 = imin(a.K4, f0 + kLutFold);
    // [t][q]: rows 4q .. 4q+3 of the half (q = 0, 1: low nibbles; 2, 3: high nibbles)
    uint32x4_t lo32[MT][4];
    int32x4_t hi32[MT][4];
    for (int t = 0; t < MT; ++t)
      for (int q = 0; q < 4; ++q) {
        lo32[t][q] = vdupq_n_u32(0);
        hi32[t][q] = vdupq_n_s32(0);
      }
    for (int64_t j0 = f0; j0 < f1; j0 += kLutWiden) {
      const int64_t j1 = imin(f1, j0 + kLutWiden);
      uint16x8_t lo16[MT][4];
      int16x8_t hi16[MT][4];
      for (int t = 0; t < MT; ++t)
        for (int q = 0; q < 4; ++q) {
          lo16[t][q] = vdupq_n_u16(0);
          hi16[t][q] = vdupq_n_s16(0);
        }
      for (int64_t j = j0; j < j1; ++j) {
        const uint8x16_t c = vld1q_u8(codes + kLutRows * j);
        const uint8x16_t idx[2] = {vandq_u8(c, low4), vshrq_n_u8(c, 4)};
        for (int t = 0; t < MT; ++t) {
          const uint8_t* tb = tables[t] + kLutTableBytes * j;
          const uint8x16_t tl = vld1q_u8(tb), th = vld1q_u8(tb + 16);
          for (int v = 0; v < 2; ++v) {
            const uint8x16_t l = vqtbl1q_u8(tl, idx[v]);
            const int8x16_t e = vreinterpretq_s8_u8(vqtbl1q_u8(th, idx[v]));
            lo16[t][2 * v] = vmlal_u8(lo16[t][2 * v], vget_low_u8(l), w_u);
            lo16[t][2 * v + 1] = vmlal_high_u8(lo16[t][2 * v + 1], l, vcombine_u8(w_u, w_u));
            hi16[t][2 * v] = vmlal_s8(hi16[t][2 * v], vget_low_s8(e), w_s);
            hi16[t][2 * v + 1] = vmlal_high_s8(hi16[t][2 * v + 1], e, vcombine_s8(w_s, w_s));
          }
        }
      }
      for (int t = 0; t < MT; ++t)
        for (int q = 0; q < 4; ++q) {
          lo32[t][q] = vpadalq_u16(lo32[t][q], lo16[t][q]);
          hi32[t][q] = vpadalq_s16(hi32[t][q], hi16[t][q]);
        }
    }
    if (a.out32 && f1 - f0 == a.K4) {  // one fold: the totals 4 (lo + 256 hi) straight from the sums
      for (int t = 0; t < MT; ++t)
        for (int q = 0; q < 4; ++q) {
          const int32x4_t v = vaddq_s32(vreinterpretq_s32_u32(lo32[t][q]), vshlq_n_s32(hi32[t][q], 8));
          vst1q_s32(a.out32 + (m0 + t) * a.N + nb * kLutRows + 16 * h + 4 * q, vshlq_n_s32(v, 2));
        }
      return;
    }
    for (int t = 0; t < MT; ++t)
      for (int q = 0; q < 4; ++q) {
        alignas(16) uint32_t l[4];
        alignas(16) int32_t e[4];
        vst1q_u32(l, lo32[t][q]);
        vst1q_s32(e, hi32[t][q]);
        for (int r = 0; r < 4; ++r) total[t][4 * q + r] += l[r] + 256 * int64_t(e[r]);
      }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < 16; ++r) a.store(m0 + t, nb * kLutRows + 16 * h + r, 4 * total[t][r]);
}

}  // namespace

void lut_gemv_neon(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t full = a.N / kLutRows * kLutRows;  // rows in full blocks; the rest: the portable kernel
  for (int64_t nb = n0 / kLutRows; nb < imin(n1, full) / kLutRows; ++nb)
    for (int h = 0; h < 2; ++h) {
      int64_t m0 = 0;
      for (; m0 + 2 <= a.M; m0 += 2) lut_half<2>(a, nb, h, m0);
      if (m0 < a.M) lut_half<1>(a, nb, h, m0);
    }
  if (n1 > full) lut_gemv_scalar(a, full > n0 ? full : n0, n1);
}

void lut_tables_neon(const int8_t* act, int64_t K4, uint8_t* tables) {
  // mask[i] lanes s (entries 0-7, then 8-15): all ones where bit i of s is set
  const int16_t bits[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int16x8_t mask[4][2];
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < 2; ++k) {
      const int16x8_t bit = vdupq_n_s16(static_cast<int16_t>(1 << i));
      mask[i][k] = vreinterpretq_s16_u16(vceqq_s16(vandq_s16(vld1q_s16(bits + 8 * k), bit), bit));
    }
  const int16x8_t one = vdupq_n_s16(1);
  for (int64_t j0 = 0; j0 < K4; j0 += 8) {
    // q14 of the 4 activations of code bytes j0 .. j0+7 (the plane layout is zero-padded to whole
    // groups of 64, so these reads stay inside it)
    alignas(16) int16_t q14[4][8];
    const int8_t* ah = act + (j0 / kGroupCodes) * 512 + j0 % kGroupCodes;
    for (int i = 0; i < 4; ++i) {
      const int16x8_t q = vaddq_s16(vshlq_n_s16(vmovl_s8(vld1_s8(ah + 64 * i)), 8), vmovl_s8(vld1_s8(ah + 256 + 64 * i)));
      const int16x8_t even = vandq_s16(vshrq_n_s16(q, 2), one);  // lut_q14: ties to even
      vst1q_s16(q14[i], vshrq_n_s16(vaddq_s16(q, vaddq_s16(one, even)), 2));
    }
    for (int64_t j = j0; j < imin(K4, j0 + 8); ++j) {
      int16x8_t e[2] = {vdupq_n_s16(0), vdupq_n_s16(0)};
      for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 2; ++k) e[k] = vaddq_s16(e[k], vandq_s16(vdupq_n_s16(q14[i][j - j0]), mask[i][k]));
      // little-endian: the even bytes of the 16 entries are their low bytes, the odd ones their high bytes
      const uint8x16_t b0 = vreinterpretq_u8_s16(e[0]), b1 = vreinterpretq_u8_s16(e[1]);
      vst1q_u8(tables + kLutTableBytes * j, vuzp1q_u8(b0, b1));
      vst1q_u8(tables + kLutTableBytes * j + 16, vuzp2q_u8(b0, b1));
    }
  }
}

void int_plane_neon(const IntArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows)  // the codes of kRows rows stay in L1 across the tokens
    for (int64_t m = 0; m < a.M; ++m) int_block<kRows>(a, n, m);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) int_block<1>(a, n, m);
}

void float_plane_neon(const FloatArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) float_row(a, n, m);
}

}  // namespace cpu
}  // namespace pyquant
