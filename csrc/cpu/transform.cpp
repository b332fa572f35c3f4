// The per-token math around the INT2 kernels in portable C++ (any CPU, any compiler flags of
// setup.py): with the portable kernels and on every CPU that has no wider build of it. The
// AVX-512 build (transform_avx512.cpp) does the same IEEE operations in the same order per
// element, so the activations the kernels see and the rounding of the outputs do not depend on
// the ISA the kernels run on (int mode is then bit-identical across ISAs). It is O(K + N) per
// token against O(N K) for the kernels. a * b + c must stay two roundings: no FMA contraction.
#include "transform.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "kernel_api.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace pyquant {
namespace cpu {
namespace {

// The max of x86's maxps (and of the AVX-512 build): b when either is NaN.
inline float max_of(float a, float b) { return a > b ? a : b; }
inline float min_of(float a, float b) { return a < b ? a : b; }

// (hi, lo) of round(v * inv), clamped to +-kQMax (a NaN product clamps to -kQMax, as the AVX-512
// build's does): q = 256 hi + lo, hi in [-127, 127], lo in [-128, 127].
inline void split(float v, float inv, int8_t* hi, int8_t* lo) {
  const float qmax = static_cast<float>(kQMax);
  const float t = min_of(max_of(v * inv, -qmax), qmax);
  // Round to nearest even (the default mode, as the AVX-512 build's cvtps): for |t| < 2^22, adding
  // and subtracting 1.5 * 2^23 leaves no fraction bits. Exact IEEE arithmetic, and unlike
  // std::nearbyint not a libm call per element on baseline x86-64 (no SSE4.1 round).
  const int32_t q = static_cast<int32_t>((t + 0x1.8p23f) - 0x1.8p23f);
  split_q(q, hi, lo);
}

// Butterflies of one radix-2 stage: (a, b) -> (a + b, a - b) for elements len apart.
inline void stage(float* v, int64_t h, int64_t len) {
  for (int64_t i = 0; i < h; i += 2 * len)
    for (int64_t j = i; j < i + len; ++j) {
      const float a = v[j], b = v[j + len];
      v[j] = a + b;
      v[j + len] = a - b;
    }
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

void widen_half(const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t sign = static_cast<uint32_t>(h[i] & 0x8000u) << 16;
    const uint32_t exp = (h[i] >> 10) & 0x1F;
    uint32_t mant = h[i] & 0x3FFu, bits;
    if (exp == 0x1F) {
      bits = sign | 0x7F800000u | (mant << 13) | (mant ? 0x400000u : 0u);  // Inf, or a quiet NaN (as vcvtph2ps)
    } else if (exp != 0) {
      bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
    } else if (mant == 0) {
      bits = sign;
    } else {  // subnormal mant * 2^-24: shift its leading one up to bit 10, lowering the exponent
      uint32_t e = 113;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mant & 0x3FFu) << 13);
    }
    std::memcpy(out + i, &bits, 4);
  }
}

void narrow_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    out[i] = x[i] != x[i] ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFFu) >> 16);
  }
}

void narrow_half(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    // (c10's fp16_ieee_from_fp32_value: the rounding done by a float add at the right exponent)
    const float scale_to_inf = 0x1p+112f, scale_to_zero = 0x1p-110f;
    float base = (std::fabs(x[i]) * scale_to_inf) * scale_to_zero;
    uint32_t w;
    std::memcpy(&w, x + i, 4);
    const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    const uint32_t bias_bits = (bias >> 1) + 0x07800000u;
    float bias_f;
    std::memcpy(&bias_f, &bias_bits, 4);
    base = bias_f + base;
    uint32_t bits;
    std::memcpy(&bits, &base, 4);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    out[i] = static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
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
  // Every grouping of the butterflies into passes gives the same bits: each output element is
  // the same sequence of adds and subtracts.
  for (int64_t base = 0; base < n; base += h)
    for (int64_t len = 1; len < h; len *= 2) stage(x + base, h, len);
}

double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax) {
  float scale = 1.f;
  if (had > 1) {
    fwht(xt, K, had);
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(had)));
  }
  // Sum of the chunks x'_j in double, in four partial sums: chunk j goes into set (j / 4) % 4 within
  // each run of 16 elements, the chunks of a last partial run into sets 0, 1, 2; combined as
  // (s0 + s1) + (s2 + s3): the order the AVX-512 build adds in, so both give the same bits.
  double sums[4][4] = {};  // [set][component]
  float mx = 0.f;
  auto chunk = [&](int64_t j, double* sum) {
    float p[4], r[4];
    for (int i = 0; i < 4; ++i) {
      p[i] = xt[j + i] * scale;
      sum[i] += static_cast<double>(p[i]);
    }
    // Per chunk x' (4 floats): A^T x' = x'0 A[0, :] + x'1 A[1, :] + x'2 A[2, :] + x'3 A[3, :].
    for (int i = 0; i < 4; ++i) r[i] = ((p[0] * A[i] + p[1] * A[4 + i]) + p[2] * A[8 + i]) + p[3] * A[12 + i];
    for (int i = 0; i < 4; ++i) {
      xt[j + i] = r[i];
      mx = max_of(mx, std::fabs(r[i]));
    }
  };
  int64_t j = 0;
  for (; j + 16 <= K; j += 16)
    for (int set = 0; set < 4; ++set) chunk(j + 4 * set, sums[set]);
  for (int set = 0; j < K; j += 4, ++set) chunk(j, sums[set]);
  double s[4];
  for (int i = 0; i < 4; ++i) s[i] = (sums[0][i] + sums[1][i]) + (sums[2][i] + sums[3][i]);
  // (mx: the order of a max does not matter for finite values; a NaN is caught by the sums)
  return finish_constant(s, b, mx, amax);
}

double encode_int(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst) {
  const IntScale q = int_scale(amax);
  if (q.pre != 1.f)
    for (int64_t i = 0; i < K; ++i) xt[i] *= q.pre;
  for (int64_t g = 0; g < G; ++g) {
    const float* src = xt + g * kGroupElems;
    int8_t* out = dst + g * 512;
    for (int64_t p = 0; p < kGroupCodes; ++p)
      for (int i = 0; i < 4; ++i) {
        int8_t* hi = plane ? out + i * 64 + p : out + 8 * p + i;  // plane: [hi planes][lo planes][64]
        int8_t* lo = plane ? hi + 256 : hi + 4;                   // natural: chunk p's 4 hi, then 4 lo
        split(src[4 * p + i], q.inv, hi, lo);
      }
  }
  return q.s;
}

void encode_float(const float* xt, int64_t G, float* dst) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t p = 0; p < kGroupCodes; ++p)
      for (int i = 0; i < 4; ++i) dst[g * kGroupElems + i * 64 + p] = xt[g * kGroupElems + 4 * p + i];
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

const TransformOps kPortableMath = {widen_half,  scale_input,      scale_input, transform_activations,
                                    encode_int,  dequant_row,      dequant_row, output_transform,
                                    narrow_bf16, narrow_half};

}  // namespace cpu
}  // namespace pyquant
