// NEON (Advanced SIMD) kernels for AArch64, with ARMv8.0 instructions only, so they run on every
// AArch64 CPU (Apple silicon, Graviton, Ampere, Raspberry Pi 4 and later). Same plane layout and
// same exact integers as the x86 kernels (kernel_api.h). Int mode: the u8 x s8 products go
// through vmull_s8 / vmlal_s8 (int16: the four planes sum to at most 4 * 3 * 128 = 1536) and
// vpadalq_s16 widens pairs into int32 lanes (at most 24576 per lane and group, folded into int64
// every kBlockGroups groups). Float mode: fp32 FMAs over the same planes.
// Measured only under qemu (correctness, not speed): no AArch64 machine has run them.
#include <arm_neon.h>

#include "kernel_api.h"

namespace pyquant {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows per block: each group of activations is loaded once for 4 rows

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

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

}  // namespace

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
