// The per-token math around the INT2 kernels (transform.cpp): the fused activation transform,
// its encodings for the kernels (kernel_api.h), and the output transform.
#pragma once

#include <cstdint>

namespace pyquant {
namespace cpu {

// Builds of each: portable C++ (transform.cpp, any CPU), AVX2 (transform_avx2.cpp) and AVX-512
// (transform_avx512.cpp), x86-64 only, used with the kernels of the same instruction set. All do
// the same IEEE operations in the same order per element, so they give the same bits. A kernel set
// (kernel_table.h) names the build it uses.

// In place: the unnormalized Walsh-Hadamard transform of every block of h elements of x[0, n)
// (h a power of two dividing n; h <= 1 does nothing).
void fwht(float* x, int64_t n, int64_t h);

// out[0, n) = the fp32 values of the IEEE half-precision bits h[0, n) (exact; a NaN comes out
// quiet, as the F16C conversion makes it). su and sv are fp16 in the format: a scalar conversion
// of a 4096 x 4096 layer's two took ~15 us a call, a tenth of its batch-1 GEMV.
void widen_half(const uint16_t* h, int64_t n, float* out);

// out[0, n) = x[0, n) rounded to bfloat16 / IEEE half bits, to nearest even, as torch's scalar
// conversions round (c10::BFloat16, c10::Half's portable path): a NaN becomes 0x7FC0 (bf16) or
// sign | 0x7E00 (half); past the half range, +-Inf. The outputs of bf16 and fp16 calls: one scalar
// conversion per element cost more than the kernel on MiniLM's 384 x 1536 at 29 tokens in fp16.
void narrow_bf16(const float* x, int64_t n, uint16_t* out);
void narrow_half(const float* x, int64_t n, uint16_t* out);

// xt[0, K) = float(x) * su.
void scale_input(const float* x, const float* su, int64_t K, float* xt);
void scale_input(const uint16_t* x_bf16, const float* su, int64_t K, float* xt);

// In place on xt[0, K), which holds su * x: xt <- per-4-chunk A^T (H_in xt / sqrt(had)).
// A is row-major [4, 4]. Returns the per-token constant (sum_j x'_j) . b and stores max |xt| in
// *amax (NaN when the token holds NaN or Inf).
double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax);

// int mode: encodes xt[0, K) (zero-padded to G * 256) as q = round(xt / s), s = amax / kQMax, split into
// (hi, lo) int8 in the plane or natural layout of kernel_api.h; returns s (in double: see IntScale). A non-finite amax (a
// token or a codebook with NaN or Inf) returns NaN, so that every output of the token is NaN, as
// the reference's are. xt may be scaled in place (see int_scale).
double encode_int(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst);

// (shared by both builds of encode_int) inv = kQMax / amax rounds the token; s = amax / kQMax is
// returned. Below amax ~ 1e-34, kQMax / amax overflows float: the token is first multiplied by
// pre, an exact power of two, and inv is kQMax / (amax * pre).
struct IntScale {
  float inv;
  double s;  // double: for amax near the bottom of the float range, s is below it
  float pre;
};
IntScale int_scale(float amax);

// float mode: xt (zero-padded to G * 256) in the plane layout.
void encode_float(const float* xt, int64_t G, float* dst);

// row[n] = float(d[n]) * a + c: the rotated outputs of one token from its dot products.
void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row);
void dequant_row(const float* d, int64_t N, float a, float c, float* row);

// In place on row[0, N): row <- sv * H_out(row) / sqrt(had) + bias (bias may be null).
void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias);

// (shared helper) the constant from the four component sums, and amax with non-finite tokens
double finish_constant(const double* sums, const float* b, float mx, float* amax);

// One build of the per-token math, as the driver (qlinear.cpp) calls it.
struct TransformOps {
  void (*widen_half)(const uint16_t* h, int64_t n, float* out);
  void (*scale_f32)(const float* x, const float* su, int64_t K, float* xt);
  void (*scale_bf16)(const uint16_t* x_bf16, const float* su, int64_t K, float* xt);
  double (*transform)(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax);
  double (*encode_int)(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst);
  void (*dequant_i32)(const int32_t* d, int64_t N, float a, float c, float* row);
  void (*dequant_f32)(const float* d, int64_t N, float a, float c, float* row);
  void (*output_transform)(float* row, int64_t N, int64_t had, const float* sv, const float* bias);
  void (*narrow_bf16)(const float* x, int64_t n, uint16_t* out);
  void (*narrow_half)(const float* x, int64_t n, uint16_t* out);
};
extern const TransformOps kPortableMath;  // transform.cpp
extern const TransformOps kAvx2Math;      // transform_avx2.cpp (x86-64 builds only)
extern const TransformOps kAvx512Math;    // transform_avx512.cpp (x86-64 builds only)

namespace avx512 {
void widen_half(const uint16_t* h, int64_t n, float* out);
void fwht(float* x, int64_t n, int64_t h);
void scale_input(const float* x, const float* su, int64_t K, float* xt);
void scale_input(const uint16_t* x_bf16, const float* su, int64_t K, float* xt);
double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax);
double encode_int(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst);
void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row);
void dequant_row(const float* d, int64_t N, float a, float c, float* row);
void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias);
void narrow_bf16(const float* x, int64_t n, uint16_t* out);
void narrow_half(const float* x, int64_t n, uint16_t* out);
}  // namespace avx512

}  // namespace cpu
}  // namespace pyquant
