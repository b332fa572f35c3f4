// Portable kernels: the path for CPUs without AVX2, and the plain statement of what the SIMD
// kernels compute (see kernel_api.h). The int kernel returns the same exact integers as the
// AVX2 and AVX-512 ones.
#include "kernel_api.h"

namespace pyquant {
namespace cpu {

void int_plane_scalar(const IntArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.codes + n * a.K4;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* act = a.act + m * a.act_stride;
      int64_t hi = 0, lo = 0;  // int64: no overflow to reason about here
      for (int64_t g = 0; g < a.G; ++g) {
        const int8_t* ah = act + g * 512;
        const int8_t* al = ah + 256;
        const int64_t pend = a.K4 - g * kGroupCodes < kGroupCodes ? a.K4 - g * kGroupCodes : kGroupCodes;
        for (int64_t p = 0; p < pend; ++p) {
          const int c = row[g * kGroupCodes + p];
          for (int i = 0; i < 4; ++i) {
            const int z = (c >> (6 - 2 * i)) & 3;
            hi += z * ah[i * 64 + p];
            lo += z * al[i * 64 + p];
          }
        }
      }
      a.store(m, n, 256 * hi + lo);
    }
  }
}

void float_plane_scalar(const FloatArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.codes + n * a.K4;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* act = a.act + m * a.G * kGroupElems;
      float acc = 0.f;
      for (int64_t g = 0; g < a.G; ++g) {
        const float* ag = act + g * kGroupElems;
        const int64_t pend = a.K4 - g * kGroupCodes < kGroupCodes ? a.K4 - g * kGroupCodes : kGroupCodes;
        for (int64_t p = 0; p < pend; ++p) {
          const int c = row[g * kGroupCodes + p];
          for (int i = 0; i < 4; ++i) acc += static_cast<float>((c >> (6 - 2 * i)) & 3) * ag[i * 64 + p];
        }
      }
      a.out[m * a.N + n] = acc;
    }
  }
}

}  // namespace cpu
}  // namespace pyquant
