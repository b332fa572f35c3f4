// Standalone check of the CPU kernels, no torch: every kernel set of this build that the CPU runs
// (kernel_table.h) against the portable one, on random layers. Int mode must give the same exact
// integers (and the portable kernel the integers of a naive loop over the unpacked levels); float
// mode must agree within 1e-5 of sum |z * x|; every build of the per-token math must give the
// portable build's bits. Built and run by scripts/check_portable.sh, natively and, cross-compiled,
// under qemu-aarch64. Exit code 0 when everything agrees.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernel_api.h"
#include "kernel_table.h"
#include "transform.h"

using namespace pyquant::cpu;

namespace {

int g_failures = 0;
// chunks of the LUT3 tables made in check_lut3, narrow and not (kernel_api.h): both GEMV paths ran
int64_t g_lut3_narrow = 0, g_lut3_wide = 0;

#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      ++g_failures;                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                  \
      std::printf("\n");                         \
    }                                            \
  } while (0)

struct Aligned {  // 64-byte aligned, zeroed bytes
  explicit Aligned(size_t bytes) : p(static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64))) {
    std::memset(p, 0, (bytes + 63) / 64 * 64 + 64);
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  uint8_t* p;
};

struct Case {
  int64_t N, K, M, had;
};

// The per-token math of `ops` on x [M, K]: encoded activations and per-token scales.
void prepare(const TransformOps& ops, const std::vector<float>& x, const std::vector<float>& su, const float* A,
             const float* b, const Case& c, int64_t G, bool plane, int8_t* act, std::vector<double>& scale,
             std::vector<double>& cst) {
  std::vector<float> xt(G * kGroupElems);
  for (int64_t m = 0; m < c.M; ++m) {
    std::fill(xt.begin(), xt.end(), 0.f);
    float amax;
    ops.scale_f32(x.data() + m * c.K, su.data(), c.K, xt.data());
    cst[m] = ops.transform(xt.data(), c.K, c.had, A, b, &amax);
    scale[m] = ops.encode_int(xt.data(), c.K, amax, G, plane, act + m * G * 512);
  }
}

// Codes [N, K4] in the LUT layout (kernel_api.h), as pack.cpp's pack_lut_codes makes them.
std::vector<uint8_t> lut_layout(const std::vector<uint8_t>& codes, int64_t N, int64_t K4) {
  std::vector<uint8_t> out(N * K4, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K4; ++j) lut_pack_byte(N, K4, n, j, codes[n * K4 + j], out.data());
  return out;
}

// A table-lookup GEMV on codes (its layout) and tables (`stride` bytes per token) of a case, in row
// ranges starting on multiples of kRowTile, as the driver calls it: V (int64, [M, N]).
std::vector<int64_t> run_lookup(IntKernel kernel, const Case& c, const uint8_t* codes, const uint8_t* tables,
                                int64_t stride) {
  const int64_t K4 = c.K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes;
  const bool narrow = c.K <= kInt32MaxK;
  std::vector<int32_t> o32(c.M * c.N, -1);
  std::vector<int64_t> o64(c.M * c.N, -1);
  IntArgs a{codes, c.N, K4, G, reinterpret_cast<const int8_t*>(tables), stride, c.M,
            narrow ? o32.data() : nullptr, narrow ? nullptr : o64.data(), nullptr};
  for (int64_t n0 = 0; n0 < c.N; n0 += 2 * kRowTile) kernel(a, n0, std::min(c.N, n0 + 2 * kRowTile));
  if (narrow)
    for (size_t i = 0; i < o32.size(); ++i) o64[i] = o32[i];
  return o64;
}

// Mode "lut" on the int-mode activations `act` (plane layout): the portable tables and GEMV
// against the naive 4 * sum z * q14, every set's tables and LUT GEMV against the portable ones.
// Returns the portable V (int64, [M, N]).
std::vector<int64_t> check_lut(const KernelSet* sets, int n_sets, const Case& c, const std::vector<uint8_t>& codes,
                               const int8_t* act) {
  const int64_t K4 = c.K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes, stride = K4 * kLutTableBytes;
  const std::vector<uint8_t> lut = lut_layout(codes, c.N, K4);
  std::vector<uint8_t> tables(c.M * stride);
  for (int64_t m = 0; m < c.M; ++m) lut_tables_scalar(act + m * G * 512, K4, tables.data() + m * stride);
  const auto run = [&](IntKernel kernel, const std::vector<uint8_t>& t) {
    return run_lookup(kernel, c, lut.data(), t.data(), stride);
  };
  const std::vector<int64_t> want = run(lut_gemv_scalar, tables);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; n += 5) {
      int64_t v = 0;
      const int8_t* t = act + m * G * 512;
      for (int64_t k = 0; k < c.K; ++k) {
        const int64_t j = k / 4, i = k % 4, g = j / kGroupCodes, p = j % kGroupCodes;
        const int z = (codes[n * K4 + j] >> (6 - 2 * i)) & 3;
        v += z * lut_q14(256 * t[g * 512 + i * 64 + p] + t[g * 512 + 256 + i * 64 + p]);
      }
      CHECK(4 * v == want[m * c.N + n], "portable LUT kernel vs naive sum: N=%lld K=%lld m=%lld n=%lld",
            (long long)c.N, (long long)c.K, (long long)m, (long long)n);
    }
  for (int s = 0; s < n_sets; ++s) {
    if (!sets[s].supported() || !sets[s].lut_gemv) continue;
    std::vector<uint8_t> mine(c.M * stride);
    for (int64_t m = 0; m < c.M; ++m) sets[s].lut_tables(act + m * G * 512, K4, mine.data() + m * stride);
    CHECK(mine == tables, "%s LUT tables differ from the portable ones: N=%lld K=%lld M=%lld", sets[s].name,
          (long long)c.N, (long long)c.K, (long long)c.M);
    CHECK(run(sets[s].lut_gemv, tables) == want, "%s LUT GEMV differs from the portable one: N=%lld K=%lld M=%lld",
          sets[s].name, (long long)c.N, (long long)c.K, (long long)c.M);
  }
  return want;
}

// The LUT kernels' largest sums: all levels 3 against q14 = +-kQMax / 4 everywhere (every table
// entry +-32512, the high bytes' int16 sums of the AVX2 kernel fullest) and against q14 = 8127 and
// -8065, whose entries have the largest low byte (252: the low bytes' sums fullest).
void check_lut_extremes(const KernelSet* sets, int n_sets) {
  const int64_t N = 67;
  const int8_t his[] = {127, 127, -127, -126}, los[] = {0, -4, 0, -4};  // q = 256 hi + lo
  for (int64_t K : {int64_t(1028), kInt32MaxK, int64_t(22016), int64_t(131072)})
    for (int64_t M : {1, 2, 3})
      for (int e = 0; e < 4; ++e) {
        const int64_t K4 = K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes;
        Aligned plane(M * G * 512);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < K; ++k) {
            const int64_t g = k / kGroupElems, p = (k / 4) % kGroupCodes, i = k % 4;
            int8_t* pl = reinterpret_cast<int8_t*>(plane.p) + m * G * 512 + g * 512;
            pl[64 * i + p] = his[e];
            pl[256 + 64 * i + p] = los[e];
          }
        const int64_t want = 4 * 3 * K * lut_q14(256 * his[e] + los[e]);
        const std::vector<uint8_t> lut(N * K4, 0xFF);  // every level 3: every bit of both planes
        const bool narrow = K <= kInt32MaxK;
        for (int s = 0; s < n_sets; ++s) {
          if (!sets[s].supported() || !sets[s].lut_gemv) continue;
          std::vector<uint8_t> tables(M * K4 * kLutTableBytes);
          for (int64_t m = 0; m < M; ++m)
            sets[s].lut_tables(reinterpret_cast<int8_t*>(plane.p) + m * G * 512, K4, tables.data() + m * K4 * kLutTableBytes);
          std::vector<int32_t> o32(M * N, -1);
          std::vector<int64_t> o64(M * N, -1);
          IntArgs a{lut.data(), N, K4, G, reinterpret_cast<const int8_t*>(tables.data()), K4 * kLutTableBytes, M,
                    narrow ? o32.data() : nullptr, narrow ? nullptr : o64.data(), nullptr};
          sets[s].lut_gemv(a, 0, N);
          int64_t bad = 0;
          for (int64_t i = 0; i < M * N; ++i) bad += (narrow ? o32[i] : o64[i]) != want;
          CHECK(bad == 0, "%s LUT GEMV at the extremes: %lld of %lld outputs differ (K=%lld M=%lld q=%d)", sets[s].name,
                (long long)bad, (long long)(M * N), (long long)K, (long long)M, 256 * his[e] + los[e]);
        }
      }
}

// Codes [N, K4] in the LUT3 layout (kernel_api.h), as pack.cpp's pack_lut3_codes makes them.
std::vector<uint16_t> lut3_layout(const std::vector<uint8_t>& codes, int64_t N, int64_t K4) {
  const int64_t C = lut3_chunks(K4);
  std::vector<uint16_t> out(lut3_groups(N) * C * kLut3ChunkBytes / 2, 0);
  std::vector<int64_t> element(24 * C);
  for (int64_t s = 0; s < 24 * C; ++s) element[s] = lut3_element(K4, s);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      uint16_t words[3];
      lut3_chunk_words(codes.data() + n * K4, element.data() + 24 * c, words);
      for (int w = 0; w < 3; ++w) out[lut3_word(n, N, C, c) + 32 * w] = words[w];
    }
  return out;
}

// How many of a token's LUT3 chunks its tables mark narrow (kernel_api.h).
int64_t narrow_chunks(const uint8_t* tables, int64_t K4) {
  const int64_t C = lut3_chunks(K4);
  const uint8_t* bits = lut3_narrow_bits(tables, C);
  int64_t n = 0;
  for (int64_t ch = 0; ch < C; ++ch) n += bits[ch / 8] >> (ch % 8) & 1;
  return n;
}

// Mode "lut3" on the int-mode activations `act` (plane layout): the portable tables and GEMV
// against the naive 18 * sum (z - 2) * q3 + 2 * sum q, every set with its own lut3 kernel (tables
// and GEMV) against the portable ones. Returns the portable V (int64, [M, N]).
std::vector<int64_t> check_lut3(const KernelSet* sets, int n_sets, const Case& c, const std::vector<uint8_t>& codes,
                                const int8_t* act) {
  const int64_t K4 = c.K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes, stride = lut3_table_stride(K4);
  const std::vector<uint16_t> lut3 = lut3_layout(codes, c.N, K4);
  Aligned tables(c.M * stride);
  uint8_t* tp = tables.p;
  for (int64_t m = 0; m < c.M; ++m) lut3_tables_scalar(act + m * G * 512, K4, tp + m * stride);
  for (int64_t m = 0; m < c.M; ++m) {
    const int64_t narrow = narrow_chunks(tp + m * stride, K4);
    g_lut3_narrow += narrow;
    g_lut3_wide += lut3_chunks(K4) - narrow;
  }
  const auto run = [&](IntKernel kernel, const uint8_t* t) {
    return run_lookup(kernel, c, reinterpret_cast<const uint8_t*>(lut3.data()), t, stride);
  };
  const std::vector<int64_t> want = run(lut3_gemv_scalar, tp);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; n += 5) {
      int64_t v = 0;
      const int8_t* t = act + m * G * 512;
      for (int64_t k = 0; k < c.K; ++k) {
        const int64_t j = k / 4, i = k % 4, g = j / kGroupCodes, p = j % kGroupCodes;
        const int z = (codes[n * K4 + j] >> (6 - 2 * i)) & 3, q = 256 * t[g * 512 + i * 64 + p] + t[g * 512 + 256 + i * 64 + p];
        v += kLut3Step * (z - 2) * lut3_q(q) + 2 * q;
      }
      CHECK(v == want[m * c.N + n], "portable LUT3 kernel vs naive sum: N=%lld K=%lld m=%lld n=%lld",
            (long long)c.N, (long long)c.K, (long long)m, (long long)n);
    }
  for (int s = 0; s < n_sets; ++s) {
    if (!sets[s].supported() || !sets[s].runs_lut3()) continue;
    Aligned mine(c.M * stride);
    uint8_t* mp = mine.p;
    for (int64_t m = 0; m < c.M; ++m) sets[s].lut3_tables(act + m * G * 512, K4, mp + m * stride);
    CHECK(std::memcmp(mp, tp, c.M * stride) == 0, "%s LUT3 tables differ from the portable ones: N=%lld K=%lld M=%lld",
          sets[s].name, (long long)c.N, (long long)c.K, (long long)c.M);
    CHECK(run(sets[s].lut3_gemv, tp) == want, "%s LUT3 GEMV differs from the portable one: N=%lld K=%lld M=%lld",
          sets[s].name, (long long)c.N, (long long)c.K, (long long)c.M);
  }
  return want;
}

// The LUT3 kernels' largest sums: levels all 3 or all 0 against q = +-kQMax everywhere (every
// table entry +-8127, four of them 32508 in int16), up to K = 131072 (int64 outputs); and the
// narrow chunks' (q3 = +-910: every entry +-4095, eight of them 32760).
void check_lut3_extremes(const KernelSet* sets, int n_sets) {
  const int64_t N = 130;
  for (int64_t K : {int64_t(1028), kInt32MaxK, int64_t(131072)})
    for (int q : {int(kQMax), -int(kQMax), 910 * int(kLut3Step), -910 * int(kLut3Step)})
      for (uint8_t code : {uint8_t(0xFF), uint8_t(0)}) {
        const int64_t K4 = K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes, M = 2, stride = lut3_table_stride(K4);
        Aligned plane(M * G * 512);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < K; ++k) {
            const int64_t g = k / kGroupElems, p = (k / 4) % kGroupCodes, i = k % 4;
            int8_t* pl = reinterpret_cast<int8_t*>(plane.p) + m * G * 512 + g * 512;
            split_q(q, &pl[64 * i + p], &pl[256 + 64 * i + p]);
          }
        const int z = code ? 3 : 0;
        const int64_t want = K * (kLut3Step * (z - 2) * lut3_q(q) + 2 * q);
        const std::vector<uint16_t> lut3 = lut3_layout(std::vector<uint8_t>(N * K4, code), N, K4);
        const bool narrow = K <= kInt32MaxK;
        for (int s = 0; s < n_sets; ++s) {
          if (!sets[s].supported() || !sets[s].runs_lut3()) continue;
          Aligned tables(M * stride);
          for (int64_t m = 0; m < M; ++m)
            sets[s].lut3_tables(reinterpret_cast<int8_t*>(plane.p) + m * G * 512, K4,
                                tables.p + m * stride);
          const int64_t C = lut3_chunks(K4), marked = narrow_chunks(tables.p, K4);
          CHECK(marked == (q == kQMax || q == -kQMax ? 0 : C), "%s LUT3 tables: %lld of %lld chunks narrow (q=%d)",
                sets[s].name, (long long)marked, (long long)C, q);
          std::vector<int32_t> o32(M * N, -1);
          std::vector<int64_t> o64(M * N, -1);
          IntArgs a{reinterpret_cast<const uint8_t*>(lut3.data()), N, K4, G, reinterpret_cast<const int8_t*>(tables.p),
                    stride, M, narrow ? o32.data() : nullptr, narrow ? nullptr : o64.data(), nullptr};
          sets[s].lut3_gemv(a, 0, N);
          int64_t bad = 0;
          for (int64_t i = 0; i < M * N; ++i) bad += (narrow ? o32[i] : o64[i]) != want;
          CHECK(bad == 0, "%s LUT3 GEMV at the extremes: %lld of %lld outputs differ (K=%lld q=%d z=%d)", sets[s].name,
                (long long)bad, (long long)(M * N), (long long)K, q, z);
        }
      }
}

// Mode lut3 on the GEMM: every set's requantizer against the portable one on random int-mode
// activations (natural layout, |q| <= kQMax, the extremes included): the same bytes and constant.
void check_lut3_requantize(const KernelSet* sets, int n_sets, std::mt19937& rng) {
  for (int64_t chunks : {int64_t(64), int64_t(1024), int64_t(5504)}) {
    std::vector<int8_t> act(8 * chunks);
    for (int64_t j = 0; j < chunks; ++j)
      for (int i = 0; i < 4; ++i) {
        const int pick = static_cast<int>(rng() % 8);
        act[8 * j + i] = static_cast<int8_t>(pick == 0 ? 127 : pick == 1 ? -127 : static_cast<int>(rng() % 255) - 127);
        act[8 * j + 4 + i] = static_cast<int8_t>(pick < 2 ? 0 : static_cast<int>(rng() % 256) - 128);
      }
    std::vector<int8_t> want = act;
    const int64_t want_cst = lut3_requantize_scalar(want.data(), chunks);
    for (int s = 0; s < n_sets; ++s) {
      if (!sets[s].supported() || !sets[s].lut3_requantize) continue;
      std::vector<int8_t> mine = act;
      const int64_t cst = sets[s].lut3_requantize(mine.data(), chunks);
      CHECK(mine == want && cst == want_cst, "%s lut3 requantizer differs from the portable one: chunks=%lld",
            sets[s].name, (long long)chunks);
    }
  }
}

void run_case(const Case& c, std::mt19937& rng) {
  const int64_t K4 = c.K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes;
  // Inputs from the raw integer stream (mt19937 is specified bit for bit), converted exactly: the
  // standard distributions' floats depend on the libm and on FMA contraction, which differ
  // between architectures, and the digests must compare like with like.
  const auto uniform = [&rng](float lo, float hi) { return lo + (hi - lo) * static_cast<float>(rng() >> 8) * 0x1p-24f; };
  std::vector<uint8_t> codes(c.N * K4);
  for (auto& v : codes) v = static_cast<uint8_t>(rng() >> 24);
  std::vector<float> x(c.M * c.K), su(c.K);
  for (auto& v : x) v = uniform(-2.f, 2.f);
  for (auto& v : su) v = uniform(0.5f, 2.f);
  float A[16], b[4];
  for (auto& v : A) v = uniform(-1.f, 1.f);
  for (auto& v : b) v = uniform(-1.f, 1.f);

  int n_sets;
  const KernelSet* sets = kernel_sets(&n_sets);
  const KernelSet& portable = sets[0];
  const bool narrow = c.K <= kInt32MaxK;

  // Portable reference: plane-layout activations, int and float dot products.
  Aligned act(c.M * G * 512), actf(c.M * G * kGroupElems * 4);
  std::vector<double> scale(c.M), cst(c.M);
  prepare(*portable.math, x, su, A, b, c, G, true, reinterpret_cast<int8_t*>(act.p), scale, cst);
  std::vector<int64_t> want(c.M * c.N);
  {
    std::vector<int32_t> o32(c.M * c.N);
    IntArgs a{codes.data(), c.N, K4, G, reinterpret_cast<int8_t*>(act.p), G * 512, c.M,
              narrow ? o32.data() : nullptr, narrow ? nullptr : want.data(), nullptr};
    portable.int_gemv(a, 0, c.N);
    if (narrow)
      for (size_t i = 0; i < o32.size(); ++i) want[i] = o32[i];
  }
  // ... which must be the naive sum over the unpacked levels of z * (256 hi + lo).
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; n += 7) {
      int64_t v = 0;
      const int8_t* t = reinterpret_cast<int8_t*>(act.p) + m * G * 512;
      for (int64_t k = 0; k < c.K; ++k) {
        const int64_t j = k / 4, i = k % 4, g = j / kGroupCodes, p = j % kGroupCodes;
        const int z = (codes[n * K4 + j] >> (6 - 2 * i)) & 3;
        v += z * (256 * t[g * 512 + i * 64 + p] + t[g * 512 + 256 + i * 64 + p]);
      }
      CHECK(v == want[m * c.N + n], "portable int kernel vs naive sum: N=%lld K=%lld m=%lld n=%lld",
            (long long)c.N, (long long)c.K, (long long)m, (long long)n);
    }
  // What int mode promises to be the same on every CPU, x86-64 and AArch64 alike: the encoded
  // activations, the per-token scales and constants, and the dot products. scripts/check_portable.sh
  // compares this line of a native run with that of the AArch64 build under qemu.
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  const auto mix = [&h](const void* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 1099511628211ull;
  };
  mix(act.p, c.M * G * 512);
  mix(scale.data(), 8 * c.M);
  mix(cst.data(), 8 * c.M);
  mix(want.data(), 8 * want.size());
  mix(check_lut(sets, n_sets, c, codes, reinterpret_cast<const int8_t*>(act.p)).data(), 8 * c.M * c.N);
  mix(check_lut3(sets, n_sets, c, codes, reinterpret_cast<const int8_t*>(act.p)).data(), 8 * c.M * c.N);
  std::printf("digest %016llx\n", (unsigned long long)h);

  std::vector<float> xtf(G * kGroupElems), wantf(c.M * c.N), bound(c.M * c.N, 0.f);
  for (int64_t m = 0; m < c.M; ++m) {
    std::fill(xtf.begin(), xtf.end(), 0.f);
    float amax;
    portable.math->scale_f32(x.data() + m * c.K, su.data(), c.K, xtf.data());
    portable.math->transform(xtf.data(), c.K, c.had, A, b, &amax);
    encode_float(xtf.data(), G, reinterpret_cast<float*>(actf.p) + m * G * kGroupElems);
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t k = 0; k < c.K; ++k)
        bound[m * c.N + n] += 3.f * std::fabs(xtf[k]);
  }
  FloatArgs fa{codes.data(), c.N, K4, G, reinterpret_cast<float*>(actf.p), c.M, wantf.data()};
  portable.float_gemv(fa, 0, c.N);

  for (int s = 1; s < n_sets; ++s) {
    const KernelSet& set = sets[s];
    if (!set.supported()) {
      std::printf("  (%s: not supported by this CPU, skipped)\n", set.name);
      continue;
    }
    // Its per-token math: the same bytes and scales as the portable build's.
    Aligned act2(c.M * G * 512);
    std::vector<double> scale2(c.M), cst2(c.M);
    prepare(*set.math, x, su, A, b, c, G, true, reinterpret_cast<int8_t*>(act2.p), scale2, cst2);
    CHECK(std::memcmp(act.p, act2.p, c.M * G * 512) == 0 && scale == scale2 && cst == cst2,
          "%s per-token math differs from the portable build's (N=%lld K=%lld)", set.name, (long long)c.N,
          (long long)c.K);
    std::vector<float> row(c.N), row2(c.N), sv(c.N, 0.75f), bias(c.N, 0.25f);
    std::vector<int32_t> d(c.N);
    for (int64_t n = 0; n < c.N; ++n) d[n] = static_cast<int32_t>(want[n] % 100000);
    portable.math->dequant_i32(d.data(), c.N, 1e-3f, 0.5f, row.data());
    set.math->dequant_i32(d.data(), c.N, 1e-3f, 0.5f, row2.data());
    const int64_t had_out = (c.N & (c.N - 1)) == 0 ? c.N : 1;
    portable.math->output_transform(row.data(), c.N, had_out, sv.data(), bias.data());
    set.math->output_transform(row2.data(), c.N, had_out, sv.data(), bias.data());
    CHECK(std::memcmp(row.data(), row2.data(), 4 * c.N) == 0, "%s output transform differs (N=%lld)", set.name,
          (long long)c.N);

    // Int GEMV over two row ranges (the driver's tiles start at multiples of kRowTile).
    std::vector<int32_t> o32(c.M * c.N, -1);
    std::vector<int64_t> o64(c.M * c.N, -1);
    IntArgs a{codes.data(), c.N, K4, G, reinterpret_cast<int8_t*>(act.p), G * 512, c.M,
              narrow ? o32.data() : nullptr, narrow ? nullptr : o64.data(), nullptr};
    const int64_t cut = c.N > kRowTile ? kRowTile : c.N;
    set.int_gemv(a, 0, cut);
    set.int_gemv(a, cut, c.N);
    int64_t bad = 0;
    for (int64_t i = 0; i < c.M * c.N; ++i) bad += (narrow ? o32[i] : o64[i]) != want[i];
    CHECK(bad == 0, "%s int GEMV: %lld of %lld outputs differ (N=%lld K=%lld M=%lld)", set.name, (long long)bad,
          (long long)(c.M * c.N), (long long)c.N, (long long)c.K, (long long)c.M);

    const int64_t packed_bytes = set.packed_bytes ? set.packed_bytes(c.M, G) : 0;
    if (packed_bytes) {  // its operands made once, as the driver does, 16 tokens at a time
      Aligned packed(packed_bytes);
      for (int64_t m = 0; m < c.M; m += kPackTokenBlock)
        set.pack_tokens(a, m, c.M - m < kPackTokenBlock ? c.M - m : kPackTokenBlock, packed.p);
      std::fill(o32.begin(), o32.end(), -1);
      std::fill(o64.begin(), o64.end(), -1);
      IntArgs p = a;
      p.packed = packed.p;
      set.int_gemv(p, 0, cut);
      set.int_gemv(p, cut, c.N);
      bad = 0;
      for (int64_t i = 0; i < c.M * c.N; ++i) bad += (narrow ? o32[i] : o64[i]) != want[i];
      CHECK(bad == 0, "%s int GEMV on packed operands: %lld of %lld outputs differ (N=%lld K=%lld M=%lld)", set.name,
            (long long)bad, (long long)(c.M * c.N), (long long)c.N, (long long)c.K, (long long)c.M);
    }

    if (set.int_gemm) {  // natural layout
      Aligned nat(c.M * G * 512), scratch(gemm_scratch_bytes(K4));
      prepare(*set.math, x, su, A, b, c, G, false, reinterpret_cast<int8_t*>(nat.p), scale2, cst2);
      std::fill(o32.begin(), o32.end(), -1);
      std::fill(o64.begin(), o64.end(), -1);
      IntArgs g{codes.data(), c.N, K4, G, reinterpret_cast<int8_t*>(nat.p), G * 512, c.M,
                narrow ? o32.data() : nullptr, narrow ? nullptr : o64.data(), reinterpret_cast<uint32_t*>(scratch.p)};
      set.int_gemm(g, 0, cut);
      set.int_gemm(g, cut, c.N);
      bad = 0;
      for (int64_t i = 0; i < c.M * c.N; ++i) bad += (narrow ? o32[i] : o64[i]) != want[i];
      CHECK(bad == 0, "%s int GEMM: %lld of %lld outputs differ (N=%lld K=%lld M=%lld)", set.name, (long long)bad,
            (long long)(c.M * c.N), (long long)c.N, (long long)c.K, (long long)c.M);
    }

    std::vector<float> of(c.M * c.N, NAN);
    FloatArgs f{codes.data(), c.N, K4, G, reinterpret_cast<float*>(actf.p), c.M, of.data()};
    set.float_gemv(f, 0, cut);
    set.float_gemv(f, cut, c.N);
    double worst = 0;
    for (int64_t i = 0; i < c.M * c.N; ++i) {
      const double err = std::fabs(static_cast<double>(of[i]) - wantf[i]) / (bound[i] + 1e-30);
      worst = std::isnan(err) ? INFINITY : (err > worst ? err : worst);
    }
    CHECK(worst <= 1e-5, "%s float GEMV: error %.3g of sum |z x| (N=%lld K=%lld M=%lld)", set.name, worst,
          (long long)c.N, (long long)c.K, (long long)c.M);
  }
}

// fp16 -> fp32 of every kernel set's math on all 65536 bit patterns: the portable build against
// values it must give, every other build against the portable one, bit for bit (NaNs included).
void check_widen_half(const KernelSet* sets, int n_sets) {
  std::vector<uint16_t> h(65536);
  for (int i = 0; i < 65536; ++i) h[i] = static_cast<uint16_t>(i);
  std::vector<float> want(65536), got(65536);
  sets[0].math->widen_half(h.data(), 65536, want.data());
  const struct { uint16_t h; float f; } known[] = {{0x3C00, 1.f}, {0xC000, -2.f}, {0x0001, 0x1p-24f},
                                                    {0x03FF, 1023 * 0x1p-24f}, {0x0400, 0x1p-14f}, {0x7BFF, 65504.f},
                                                    {0x8000, -0.f}, {0x7C00, INFINITY}, {0x3555, 0x1.554p-2f}};
  for (const auto& k : known)
    CHECK(std::memcmp(&want[k.h], &k.f, 4) == 0, "portable widen_half(0x%04x) = %a, want %a", k.h, want[k.h], k.f);
  CHECK(std::isnan(want[0x7C01]) && std::isnan(want[0xFE00]), "portable widen_half: NaN in, not NaN out");
  for (int s = 1; s < n_sets; ++s) {
    if (!sets[s].supported()) continue;
    sets[s].math->widen_half(h.data() + 3, 65533, got.data());  // an odd length: the tail path too
    CHECK(std::memcmp(want.data() + 3, got.data(), 4 * 65533) == 0, "%s widen_half differs from the portable one",
          sets[s].name);
  }
}

// Rounding to bf16 and half: the portable build on known values, every other build against it on
// 2^20 random bit patterns (NaNs with payloads, subnormals, values past the half range) and the
// halfway cases of both formats, over an odd length (the tail path too).
void check_narrow(const KernelSet* sets, int n_sets, std::mt19937& rng) {
  const int64_t n = (int64_t(1) << 20) + 5;
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(rng());
    if (i % 4 == 1) u = (u & 0xFFFF0000u) | 0x8000u;  // bf16 halfway
    if (i % 4 == 2) u = (u & 0x8FFFE000u) | 0x38001000u;  // half halfway, in or below the half range
    std::memcpy(&x[i], &u, 4);
  }
  std::vector<uint16_t> want_b(n), want_h(n), got(n);
  sets[0].math->narrow_bf16(x.data(), n, want_b.data());
  sets[0].math->narrow_half(x.data(), n, want_h.data());
  const struct { float f; uint16_t b, h; } known[] = {{1.f, 0x3F80, 0x3C00}, {-2.f, 0xC000, 0xC000},
                                                      {65504.f, 0x4780, 0x7BFF}, {65520.f, 0x4780, 0x7C00},
                                                      {0x1p-24f, 0x3380, 0x0001}, {0x1p-25f, 0x3300, 0x0000},
                                                      {1.f + 0x1p-8f, 0x3F80, 0x3C04}, {1.f + 0x3p-8f, 0x3F82, 0x3C0C},
                                                      {-INFINITY, 0xFF80, 0xFC00}, {-NAN, 0x7FC0, 0xFE00}};
  for (const auto& k : known) {
    uint16_t b, h;
    sets[0].math->narrow_bf16(&k.f, 1, &b);
    sets[0].math->narrow_half(&k.f, 1, &h);
    CHECK(b == k.b && h == k.h, "portable narrowing of %a: bf16 0x%04x half 0x%04x, want 0x%04x 0x%04x", k.f, b, h,
          k.b, k.h);
  }
  for (int s = 1; s < n_sets; ++s) {
    if (!sets[s].supported()) continue;
    sets[s].math->narrow_bf16(x.data(), n, got.data());
    CHECK(got == want_b, "%s bf16 rounding differs from the portable one", sets[s].name);
    sets[s].math->narrow_half(x.data(), n, got.data());
    CHECK(got == want_h, "%s half rounding differs from the portable one", sets[s].name);
  }
}

// The per-token math of every kernel set against the portable build's bits, for every Hadamard
// block size (each build has its own paths for small, register-sized and large blocks), on
// lengths of 1, 2, 3 and 8 blocks (and partial runs of chunks), with and without bias.
void check_transforms(const KernelSet* sets, int n_sets, std::mt19937& rng) {
  const auto uniform = [&rng](float lo, float hi) { return lo + (hi - lo) * static_cast<float>(rng() >> 8) * 0x1p-24f; };
  float A[16], b[4];
  for (auto& v : A) v = uniform(-1.f, 1.f);
  for (auto& v : b) v = uniform(-1.f, 1.f);
  for (int64_t had : {0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024})
    for (int64_t blocks : {1, 2, 3, 8}) {
      // without a Hadamard block of 16 or more, also lengths of 16 blocks + 4, 8 and 12 (the
      // vector builds' partial runs of chunks)
      const int64_t n = had > 4 ? had * blocks : 16 * blocks + 4 * (blocks % 4);
      std::vector<float> x(n), su(n), sv(n), bias(n);
      for (auto& v : x) v = uniform(-4.f, 4.f);
      for (auto& v : su) v = uniform(-2.f, 2.f);
      for (auto& v : sv) v = uniform(0.5f, 2.f);
      for (auto& v : bias) v = uniform(-1.f, 1.f);
      std::vector<float> want(n), got(n), want_out(n), got_out(n);
      float want_amax, got_amax;
      sets[0].math->scale_f32(x.data(), su.data(), n, want.data());
      const double want_c = sets[0].math->transform(want.data(), n, had, A, b, &want_amax);
      for (int s = 1; s < n_sets; ++s) {
        if (!sets[s].supported()) continue;
        sets[s].math->scale_f32(x.data(), su.data(), n, got.data());
        const double got_c = sets[s].math->transform(got.data(), n, had, A, b, &got_amax);
        CHECK(std::memcmp(want.data(), got.data(), 4 * n) == 0 && want_c == got_c && want_amax == got_amax,
              "%s activation transform differs from the portable one (had=%lld n=%lld)", sets[s].name,
              (long long)had, (long long)n);
        for (const float* bp : {static_cast<const float*>(bias.data()), static_cast<const float*>(nullptr)}) {
          want_out = x;
          got_out = x;
          sets[0].math->output_transform(want_out.data(), n, had, sv.data(), bp);
          sets[s].math->output_transform(got_out.data(), n, had, sv.data(), bp);
          CHECK(std::memcmp(want_out.data(), got_out.data(), 4 * n) == 0,
                "%s output transform differs from the portable one (had=%lld n=%lld bias=%d)", sets[s].name,
                (long long)had, (long long)n, bp != nullptr);
        }
      }
    }
}

// The largest products every kernel can meet: all levels 3 against activations of hi = 127 and
// lo = -128 everywhere (and the opposite signs), where the kernels' narrow partial sums (int16 in
// the AVX2 GEMV, int32 lanes up to kBlockGroups groups) are closest to overflowing. V is then
// 3 K (256 hi + lo) for every output.
void check_extremes(const KernelSet* sets, int n_sets) {
  const int64_t N = 35;
  for (int64_t K : {int64_t(1028), int64_t(8192), kInt32MaxK, int64_t(22016)})
    for (int64_t M : {1, 2, 3, 5, 17})
      for (int sign : {1, -1}) {
        const int64_t K4 = K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes;
        const int8_t hi = static_cast<int8_t>(127 * sign), lo = static_cast<int8_t>(sign > 0 ? -128 : 127);
        const int64_t want = 3 * K * (256 * int64_t(hi) + lo);
        std::vector<uint8_t> codes(N * K4, 0xFF);
        Aligned plane(M * G * 512), natural(M * G * 512), scratch(gemm_scratch_bytes(K4));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < K; ++k) {  // element k: chunk p = k / 4, plane i = k % 4 (kernel_api.h)
            const int64_t g = k / kGroupElems, p = (k / 4) % kGroupCodes, i = k % 4;
            int8_t* pl = reinterpret_cast<int8_t*>(plane.p) + m * G * 512 + g * 512;
            pl[64 * i + p] = hi;
            pl[256 + 64 * i + p] = lo;
            int8_t* nat = reinterpret_cast<int8_t*>(natural.p) + m * G * 512 + 8 * (k / 4);
            nat[i] = hi;
            nat[4 + i] = lo;
          }
        const bool narrow = K <= kInt32MaxK;
        for (int s = 0; s < n_sets; ++s) {
          if (!sets[s].supported()) continue;
          for (int layout = 0; layout < 3; ++layout) {
            const bool packed = layout == 1, gemm = layout == 2;
            if ((packed && !sets[s].packed_bytes) || (gemm && !sets[s].int_gemm)) continue;
            std::vector<int32_t> o32(M * N, -1);
            std::vector<int64_t> o64(M * N, -1);
            IntArgs a{codes.data(), N, K4, G, reinterpret_cast<int8_t*>(gemm ? natural.p : plane.p), G * 512, M,
                      narrow ? o32.data() : nullptr, narrow ? nullptr : o64.data(),
                      reinterpret_cast<uint32_t*>(scratch.p)};
            const int64_t bytes = packed ? sets[s].packed_bytes(M, G) : 0;
            if (packed && !bytes) continue;  // too few tokens for the packed operands
            Aligned ops(bytes ? bytes : 1);
            if (packed) {
              for (int64_t m = 0; m < M; m += kPackTokenBlock)
                sets[s].pack_tokens(a, m, M - m < kPackTokenBlock ? M - m : kPackTokenBlock, ops.p);
              a.packed = ops.p;
            }
            (gemm ? sets[s].int_gemm : sets[s].int_gemv)(a, 0, N);
            int64_t bad = 0;
            for (int64_t i = 0; i < M * N; ++i) bad += (narrow ? o32[i] : o64[i]) != want;
            CHECK(bad == 0, "%s %s at the extremes: %lld of %lld outputs differ (K=%lld M=%lld sign=%d)", sets[s].name,
                  gemm ? "GEMM" : packed ? "GEMV on packed operands" : "GEMV", (long long)bad, (long long)(M * N),
                  (long long)K, (long long)M, sign);
          }
        }
      }
}

}  // namespace

int main() {
  int n_sets;
  const KernelSet* sets = kernel_sets(&n_sets);
  std::printf("kernel sets in this build:");
  for (int s = 0; s < n_sets; ++s) std::printf(" %s%s", sets[s].name, sets[s].supported() ? "" : " (unsupported)");
  std::printf("; best: %s\n", best_kernel_set().name);
  check_widen_half(sets, n_sets);
  std::mt19937 rng(0);
  check_narrow(sets, n_sets, rng);
  // Partial last groups (K4 % 64 != 0; of at most 32 code bytes the tile kernels pair the planes),
  // rows that are not a multiple of the row blocks (the GEMV's: 2d rows, d = 8 at K = 384, 4 at
  // 4096, 1 at 22016), one and several tokens, Hadamard on and off, and a K above kInt32MaxK
  // (int64 outputs) for the GEMVs (1 and 2 tokens) and the tile kernels (3 to 8 tokens, narrow,
  // and more).
  const Case cases[] = {{37, 384, 1, 128},  {64, 256, 3, 0},     {67, 1536, 5, 512}, {45, 100, 2, 4},
                        {96, 4096, 40, 128}, {33, 22016, 2, 256}, {130, 1028, 33, 4}, {20, 22016, 19, 256},
                        {50, 512, 8, 64},   {16, 768, 9, 256},   {19, 4096, 1, 0},   {9, 22016, 1, 256},
                        {40, 22016, 5, 256}, {37, 384, 6, 128},  {29, 384, 29, 128}, {45, 100, 7, 4}};
  for (const auto& c : cases) {
    std::printf("N=%lld K=%lld M=%lld had=%lld\n", (long long)c.N, (long long)c.K, (long long)c.M, (long long)c.had);
    run_case(c, rng);
  }
  check_transforms(sets, n_sets, rng);
  check_extremes(sets, n_sets);
  check_lut_extremes(sets, n_sets);
  check_lut3_extremes(sets, n_sets);
  std::printf("LUT3 chunks: %lld narrow, %lld not\n", (long long)g_lut3_narrow, (long long)g_lut3_wide);
  CHECK(g_lut3_narrow > 0 && g_lut3_wide > 0, "the random cases made no narrow or no wide LUT3 chunk");
  check_lut3_requantize(sets, n_sets, rng);
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all kernel sets agree with the portable kernels\n");
  return 0;
}
