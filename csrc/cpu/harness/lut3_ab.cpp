// Two versions of the AVX-512 lut3 GEMV side by side, call by call, on one thread: the build's
// own (kernels_lut3_avx512.cpp) and a variant of that file, compiled with its two entry points
// renamed (no torch):
//
//   S=csrc/cpu; F="-O3 -std=c++17 -ffp-contract=off -I$S"
//   g++ $F -c variant.cpp -Dlut3_gemv_avx512=lut3_gemv_variant -Dlut3_tables_avx512=lut3_tables_variant \
//       -o /tmp/variant.o
//   g++ $F $S/harness/lut3_ab.cpp $S/kernel_table.cpp $S/transform.cpp $S/kernels_scalar.cpp \
//       <the x86_64 files of arch_sources.json> /tmp/variant.o -o /tmp/lut3_ab
//   /tmp/lut3_ab N K M CALLS    e.g. /tmp/lut3_ab 512 4096 8 400
//
// For changes to the loop's instructions: the layer (N x K, codes and M tokens' tables) stays in
// cache, and calls of the two versions alternate, so that the machine's drift (a shared VM: 15-20 %
// between identical runs of kernel_bench, minutes apart) falls on both alike. It prints TSC ticks
// per block and chunk (32 rows x 24 weights x one token) of each (min, 10th and 50th percentile)
// and B / A at the 10th percentile; session 30: A / A 0.998-1.006 in five runs, where separate
// kernel_bench runs could not tell 3 % apart. Not for changes to how the codes stream from memory:
// from memory, calls of two versions alternating move each other's times (session 30, kernel_bench
// made to alternate: the GEMV without prefetches at 0.66-0.73x the base there, but 1.4-1.7x slower
// in separate runs).
#include <x86intrin.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "bench_inputs.h"
#include "kernel_api.h"

namespace pyquant {
namespace cpu {
void lut3_gemv_variant(const IntArgs& a, int64_t n0, int64_t n1);
}  // namespace cpu
}  // namespace pyquant

using namespace pyquant::cpu;

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s N K M CALLS\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atol(argv[1]), K = std::atol(argv[2]), M = std::atol(argv[3]);
  const int calls = std::atoi(argv[4]);
  if (N <= 0 || K <= 0 || K % 4 || M <= 0 || calls <= 0 || K > kInt32MaxK) {
    std::fprintf(stderr, "N, K, M and CALLS must be positive, K a multiple of 4 and at most %ld (int32 outputs)\n",
                 long(kInt32MaxK));
    return 2;
  }
  if (!__builtin_cpu_supports("avx512vbmi2")) {
    std::fprintf(stderr, "this CPU has no AVX-512 VBMI2: no AVX-512 lut3 kernel to time\n");
    return 2;
  }
  const int64_t K4 = K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes, C = lut3_chunks(K4);
  std::mt19937 rng(1);
  std::vector<uint8_t> codes(lut3_groups(N) * C * kLut3ChunkBytes);  // (random bytes are valid codes)
  for (auto& c : codes) c = static_cast<uint8_t>(rng());
  const std::vector<int8_t> act = normal_activations(M, G, rng);
  const int64_t stride = lut3_table_stride(K4);
  auto* t = static_cast<uint8_t*>(std::aligned_alloc(64, M * stride));  // (stride: whole 64-byte lines)
  for (int64_t m = 0; m < M; ++m) lut3_tables_avx512(act.data() + m * G * 512, K4, t + m * stride);
  std::vector<int32_t> out_a(M * N), out_b(M * N);
  IntArgs a{codes.data(), N, K4, G, reinterpret_cast<const int8_t*>(t), stride, M, out_a.data(), nullptr, nullptr, nullptr};
  IntArgs b = a;
  b.out32 = out_b.data();
  std::vector<double> ta, tb;
  for (int i = 0; i < calls; ++i) {
    const uint64_t t0 = __rdtsc();
    lut3_gemv_avx512(a, 0, N);
    const uint64_t t1 = __rdtsc();
    lut3_gemv_variant(b, 0, N);
    const uint64_t t2 = __rdtsc();
    ta.push_back(double(t1 - t0));
    tb.push_back(double(t2 - t1));
  }
  std::sort(ta.begin(), ta.end());
  std::sort(tb.begin(), tb.end());
  const double blocks = double((N + 31) / 32) * C * M;
  const auto at = [&](const std::vector<double>& v, double f) { return v[size_t(f * (v.size() - 1))] / blocks; };
  std::printf("%ld x %ld (in x out), %ld tokens, %d calls each; TSC ticks per block and chunk:\n", long(K), long(N),
              long(M), calls);
  std::printf("A (the build's) min %.2f p10 %.2f p50 %.2f | B (variant) min %.2f p10 %.2f p50 %.2f | B / A %.3f%s\n",
              at(ta, 0), at(ta, .1), at(ta, .5), at(tb, 0), at(tb, .1), at(tb, .5), at(tb, .1) / at(ta, .1),
              out_a == out_b ? "" : "  (outputs differ)");
  return out_a == out_b ? 0 : 1;
}
