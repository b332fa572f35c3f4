// Portable kernels: the path for CPUs without AVX2, and the plain statement of what the SIMD
// kernels compute (see kernel_api.h). The int kernel returns the same exact integers as the
// AVX2 and AVX-512 ones; the LUT ones (mode "lut") the same as the AVX2 LUT kernel.
#include <cstring>

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

void lut_tables_scalar(const int8_t* act, int64_t K4, uint8_t* tables) {
  for (int64_t j = 0; j < K4; ++j) {
    const int8_t* ah = act + (j / kGroupCodes) * 512 + j % kGroupCodes;
    int q14[4];
    for (int i = 0; i < 4; ++i) q14[i] = lut_q14(256 * ah[64 * i] + ah[256 + 64 * i]);
    uint8_t* t = tables + j * kLutTableBytes;
    for (int s = 0; s < 16; ++s) {
      int e = 0;
      for (int i = 0; i < 4; ++i) e += (s >> i & 1) * q14[i];
      t[s] = static_cast<uint8_t>(e & 255);
      t[16 + s] = static_cast<uint8_t>((e >> 8) & 255);
    }
  }
}

void lut_gemv_scalar(const IntArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const auto* tables = reinterpret_cast<const uint8_t*>(a.act + m * a.act_stride);
      int64_t acc = 0;
      for (int64_t j = 0; j < a.K4; ++j) {
        int plane[2];
        for (int p = 0; p < 2; ++p) {
          int64_t byte;
          int shift;
          lut_nibble(a.N, a.K4, n, j, p, &byte, &shift);
          plane[p] = (a.codes[byte] >> shift) & 15;
        }
        const uint8_t* t = tables + j * kLutTableBytes;
        const auto entry = [&](int s) { return t[s] + 256 * static_cast<int8_t>(t[16 + s]); };
        acc += entry(plane[0]) + 2 * entry(plane[1]);
      }
      a.store(m, n, 4 * acc);
    }
  }
}

void lut3_tables_scalar(const int8_t* act, int64_t K4, uint8_t* tables) {
  const int64_t C = lut3_chunks(K4);
  int64_t sum = 0, offsets = 0;
  auto* e = reinterpret_cast<int16_t*>(tables + kLut3HeadBytes);
  Lut3NarrowBits narrow{lut3_narrow_bits(tables, C)};
  std::memset(narrow.bits, 0, lut3_narrow_bytes(C));
  for (int64_t t = 0; t < 8 * C; ++t) {
    int16_t q3[3];
    for (int w = 0; w < 3; ++w) {
      const int64_t k = lut3_element(K4, 3 * t + w);
      q3[w] = 0;
      if (k < 0) continue;
      const int8_t* ah = act + (k / 256) * 512 + (k % 4) * 64 + (k % 256) / 4;
      const int q = 256 * ah[0] + ah[256];
      q3[w] = static_cast<int16_t>(lut3_q(q));
      sum += q;
    }
    const int o = lut3_offset(q3);
    offsets += o;
    narrow.add(t, q3);
    for (int index = 0; index < 64; ++index) {
      int v = -o;
      for (int w = 0; w < 3; ++w) v += ((index >> (2 * w) & 3) - 2) * q3[w];
      e[64 * t + index] = static_cast<int16_t>(v);
    }
  }
  *reinterpret_cast<int64_t*>(tables) = kLut3Step * offsets + 2 * sum;
}

void lut3_gemv_scalar(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t C = lut3_chunks(a.K4);
  for (int64_t n = n0; n < n1; ++n) {
    const auto* codes = reinterpret_cast<const uint16_t*>(a.codes);
    for (int64_t m = 0; m < a.M; ++m) {
      const auto* tables = reinterpret_cast<const uint8_t*>(a.act + m * a.act_stride);
      const auto* e = reinterpret_cast<const int16_t*>(tables + kLut3HeadBytes);
      int64_t acc = 0;
      for (int64_t c = 0; c < C; ++c) {
        const uint16_t* rec = codes + lut3_word(n, a.N, C, c);  // this row's three words of the chunk
        const uint16_t words[3] = {rec[0], rec[32], rec[64]};
        for (int j = 0; j < 8; ++j) acc += e[64 * (8 * c + j) + lut3_index(j, words)];
      }
      a.store(m, n, kLut3Step * acc + *reinterpret_cast<const int64_t*>(tables));
    }
  }
}

int64_t lut3_requantize_scalar(int8_t* act, int64_t chunks) {
  int64_t sum_q = 0, sum_q3 = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    int8_t* chunk = act + 8 * j;  // 4 hi bytes, then 4 lo bytes
    for (int i = 0; i < 4; ++i) {
      const int q = 256 * chunk[i] + chunk[4 + i], q3 = lut3_q(q);
      sum_q += q;
      sum_q3 += q3;
      chunk[i] = static_cast<int8_t>((q3 + 128) >> 8);
      chunk[4 + i] = static_cast<int8_t>(q3 & 255);
    }
  }
  return 2 * sum_q - 2 * kLut3Step * sum_q3;
}

}  // namespace cpu
}  // namespace pyquant
