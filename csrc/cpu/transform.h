// The per-token math around the INT2 kernels (transform.cpp): the fused activation transform,
// its encodings for the kernels (kernel_api.h), and the output transform.
#pragma once

#include <cstdint>

namespace pyquant {
namespace cpu {

// Two builds of each: baseline SSE2 (transform.cpp, any x86-64 CPU) and AVX-512
// (transform_avx512.cpp, used with the AVX-512 kernels). Both do the same IEEE operations in the
// same order per element, so they give the same bits.

// In place: the unnormalized Walsh-Hadamard transform of every block of h elements of x[0, n)
// (h a power of two dividing n; h <= 1 does nothing).
void fwht(float* x, int64_t n, int64_t h);

// xt[0, K) = float(x) * su.
void scale_input(const float* x, const float* su, int64_t K, float* xt);
void scale_input(const uint16_t* x_bf16, const float* su, int64_t K, float* xt);

// In place on xt[0, K), which holds su * x: xt <- per-4-chunk A^T (H_in xt / sqrt(had)).
// A is row-major [4, 4]. Returns the per-token constant (sum_j x'_j) . b and stores max |xt| in
// *amax (NaN when the token holds NaN or Inf).
double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax);

// int mode: encodes xt (zero-padded to G * 256) as q = round(xt / s), s = amax / kQMax, split into
// (hi, lo) int8 in the plane or natural layout of kernel_api.h; returns s.
float encode_int(const float* xt, float amax, int64_t G, bool plane, int8_t* dst);

// float mode: xt (zero-padded to G * 256) in the plane layout.
void encode_float(const float* xt, int64_t G, float* dst);

// row[n] = float(d[n]) * a + c: the rotated outputs of one token from its dot products.
void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row);
void dequant_row(const float* d, int64_t N, float a, float c, float* row);

// In place on row[0, N): row <- sv * H_out(row) / sqrt(had) + bias (bias may be null).
void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias);

// (shared helper) the constant from the four component sums, and amax with non-finite tokens
double finish_constant(const double* sums, const float* b, float mx, float* amax);

namespace avx512 {
void fwht(float* x, int64_t n, int64_t h);
void scale_input(const float* x, const float* su, int64_t K, float* xt);
void scale_input(const uint16_t* x_bf16, const float* su, int64_t K, float* xt);
double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax);
float encode_int(const float* xt, float amax, int64_t G, bool plane, int8_t* dst);
void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row);
void dequant_row(const float* d, int64_t N, float a, float c, float* row);
void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias);
}  // namespace avx512

}  // namespace cpu
}  // namespace pyquant
