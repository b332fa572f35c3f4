// The per-token math around the INT2 kernels (transform.cpp): the fused activation transform,
// its encodings for the kernels (kernel_api.h), and the output transform.
#pragma once

#include <cstdint>

namespace pyquant {
namespace cpu {

// In place: the unnormalized Walsh-Hadamard transform of every block of h elements of x[0, n)
// (h a power of two dividing n; h <= 1 does nothing).
void fwht(float* x, int64_t n, int64_t h);

// In place on xt[0, K), which holds su * x: xt <- per-4-chunk A^T (H_in xt / sqrt(had)).
// A is row-major [4, 4]. Returns the per-token constant (sum_j x'_j) . b and stores max |xt|.
double transform_activations(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax);

// int mode: encodes xt (zero-padded to G * 256) as q = round(xt / s), s = amax / kQMax, split into
// (hi, lo) int8 in the plane or natural layout of kernel_api.h; returns s.
float encode_int(const float* xt, float amax, int64_t G, bool plane, int8_t* dst);

// float mode: xt (zero-padded to G * 256) in the plane layout.
void encode_float(const float* xt, int64_t G, float* dst);

// In place on row[0, N) (the rotated outputs of one token): row <- sv * H_out(row) / sqrt(had) + bias
// (bias may be null).
void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias);

}  // namespace cpu
}  // namespace pyquant
