// Standalone timing of the CPU int kernels, no torch: one layer shape, one token count, one kernel
// set, on T threads, against a read of the same number of bytes in the same run. It times the
// kernels alone (no activation transform, no dispatch), so that what a layer call adds around
// them can be told apart from what they cost (README, "Where a batch-1 call's time goes").
//
//   g++ -O3 -std=c++17 -Icsrc/cpu csrc/cpu/harness/kernel_bench.cpp csrc/cpu/kernel_table.cpp
//       csrc/cpu/transform.cpp csrc/cpu/kernels_scalar.cpp <the x86_64 files of arch_sources.json>
//       -lpthread -o /tmp/kernel_bench
//   /tmp/kernel_bench N K M THREADS [SET [MODE]]   e.g. /tmp/kernel_bench 4096 4096 1 2 amx
//
// MODE int (the default: the set's GEMV, or past its token count for the shape, kernel_api.h
// gemv_max_tokens, its GEMM where it has one) or lut: the table-lookup GEMV (kernel_api.h; random
// bytes are valid codes in the LUT layout too), the set's own or the portable one, on tables made
// once before the calls; or lut3: the triple-lookup GEMV (random bytes are valid LUT3 codes), the
// set's own where the CPU has VBMI2, else the portable one, rows split on its bands (or groups) as
// the driver splits them;
// or read: no kernel, a plain read of each call's own rows (the same split, the same cycled layers),
// which streams faster than the floor's one long read (Zen 4, one thread: ~30 vs ~22 GB/s).
//
// Each call multiplies the next of enough distinct random layers (at least 16, and 1.5 GB in all)
// that their codes come from memory, not from a last-level cache of hundreds of MB (the
// environment variable PYQUANT_BENCH_LAYERS=n cycles n layers instead: 1 keeps a small layer in
// cache, to time a kernel's compute alone); the codes sit
// in 2 MB pages, as the extension keeps large layers' codes. Threads split the rows in halves (in
// row tiles) and spin between calls; every figure is a median over calls. The read probe streams
// a 512 MB buffer in 2 MB pages on the same threads, two streams per thread like the GEMV, and
// gives the floor: the layer's code bytes at that bandwidth. Mode lut3 reads its tables made once
// before the calls, or as PYQUANT_BENCH_LUT3_TABLES says: "call", each thread makes its own per
// call, as the driver does; "only", that making alone is timed (no kernel).
#include <immintrin.h>
#include <sys/mman.h>
#include <x86intrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_inputs.h"
#include "kernel_api.h"
#include "kernel_table.h"

using namespace pyquant::cpu;

namespace {

uint8_t* huge_alloc(size_t bytes) {
  const size_t page = size_t(2) << 20, len = (bytes + page - 1) / page * page;
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(page, len));
  if (p) madvise(p, len, MADV_HUGEPAGE);
  return p;
}

// TSC ticks per second, from a 50 ms sleep.
double tsc_hz() {
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t c0 = __rdtsc();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const uint64_t c1 = __rdtsc();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return (c1 - c0) / s;
}

// Runs job(call, thread) on `threads` threads, `calls` times; returns each call's TSC ticks (all
// threads done). Workers spin between calls, as OpenMP's do between parallel regions.
std::vector<double> run_threads(int threads, int calls, const std::function<void(int, int)>& job) {
  std::atomic<int> epoch{0}, done{0};
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int e = 1; e <= calls; ++e) {
        while (epoch.load(std::memory_order_acquire) < e) _mm_pause();
        job(e - 1, t);
        done.fetch_add(1, std::memory_order_release);
      }
    });
  std::vector<double> ticks;
  for (int c = 0; c < calls; ++c) {
    done.store(0);
    const uint64_t t0 = __rdtsc();
    epoch.store(c + 1, std::memory_order_release);
    job(c, 0);
    while (done.load(std::memory_order_acquire) < threads - 1) _mm_pause();
    ticks.push_back(double(__rdtsc() - t0));
  }
  for (auto& t : pool) t.join();
  return ticks;
}

double median(std::vector<double> v, size_t skip) {
  v.erase(v.begin(), v.begin() + std::min(skip, v.size() - 1));
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// two streams (the halves of the range), four lines each per step, summed so nothing is elided
__attribute__((target("avx512f"))) void read_range_avx512(const uint8_t* p, size_t bytes) {
  const uint8_t* q = p + bytes / 2;
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i + 128 <= bytes / 2; i += 128) {
    s0 = _mm512_add_epi32(s0, _mm512_load_si512(p + i));
    s1 = _mm512_add_epi32(s1, _mm512_load_si512(p + i + 64));
    s2 = _mm512_add_epi32(s2, _mm512_load_si512(q + i));
    s3 = _mm512_add_epi32(s3, _mm512_load_si512(q + i + 64));
  }
  volatile int sink = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
  (void)sink;
}

// the same with 32-byte loads, two per line (CPUs without AVX-512: it crashed there until session 18)
__attribute__((target("avx2"))) void read_range_avx2(const uint8_t* p, size_t bytes) {
  const uint8_t* q = p + bytes / 2;
  __m256i s[8];
  for (auto& v : s) v = _mm256_setzero_si256();
  for (size_t i = 0; i + 128 <= bytes / 2; i += 128)
    for (int k = 0; k < 4; ++k) {
      s[k] = _mm256_add_epi32(s[k], _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32 * k)));
      s[4 + k] = _mm256_add_epi32(s[4 + k], _mm256_load_si256(reinterpret_cast<const __m256i*>(q + i + 32 * k)));
    }
  for (int k = 1; k < 8; ++k) s[0] = _mm256_add_epi32(s[0], s[k]);
  alignas(32) int lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s[0]);
  volatile int sink = lanes[0] + lanes[7];
  (void)sink;
}

void read_range(const uint8_t* p, size_t bytes) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) read_range_avx512(p, bytes);
  else read_range_avx2(p, bytes);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N K M THREADS [SET [MODE]]\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atol(argv[1]), K = std::atol(argv[2]), M = std::atol(argv[3]);
  const int threads = std::atoi(argv[4]);
  const KernelSet* set = argc > 5 ? find_kernel_set(argv[5]) : &best_kernel_set();
  const bool lut = argc > 6 && std::strcmp(argv[6], "lut") == 0;
  const bool lut3 = argc > 6 && std::strcmp(argv[6], "lut3") == 0;
  const bool plain_read = argc > 6 && std::strcmp(argv[6], "read") == 0;
  if (argc > 6 && !lut && !lut3 && !plain_read && std::strcmp(argv[6], "int") != 0) {
    std::fprintf(stderr, "MODE must be int, lut, lut3 or read, got '%s'\n", argv[6]);
    return 2;
  }
  if (N <= 0 || K <= 0 || K % 4 || M <= 0 || threads <= 0) {
    std::fprintf(stderr, "N, K, M and THREADS must be positive, K a multiple of 4\n");
    return 2;
  }
  if (!set || !set->supported()) {
    std::fprintf(stderr, "kernel set '%s' is not in this build or not supported by this CPU\n", argv[5]);
    return 2;
  }
  const int64_t K4 = K / 4, G = (K4 + kGroupCodes - 1) / kGroupCodes;
  const int64_t bytes = lut3 ? lut3_groups(N) * lut3_chunks(K4) * kLut3ChunkBytes : N * K4;
  const char* layers_env = std::getenv("PYQUANT_BENCH_LAYERS");
  if (layers_env && std::atoi(layers_env) <= 0) {
    std::fprintf(stderr, "PYQUANT_BENCH_LAYERS must be a positive count of layers, got '%s'\n", layers_env);
    return 2;
  }
  const int layers = layers_env ? std::atoi(layers_env)
                                : static_cast<int>(std::max<int64_t>(16, int64_t(1.5e9) / bytes + 1));
  std::mt19937 rng(1);
  // One allocation for all layers, each 64-byte aligned in it: one per layer would round each up
  // to a 2 MB page (40 000 layers of 384 x 384: 80 GB of address space, killed).
  const int64_t stride = (bytes + 63) / 64 * 64;
  uint8_t* all = huge_alloc(static_cast<size_t>(stride) * layers);
  if (!all) {
    std::fprintf(stderr, "out of memory\n");
    return 1;
  }
  std::vector<uint8_t*> codes(layers);
  for (int l = 0; l < layers; ++l) {
    codes[l] = all + l * stride;
    for (int64_t i = 0; i < bytes; i += 4) {
      const uint32_t r = rng();
      std::memcpy(codes[l] + i, &r, std::min<int64_t>(4, bytes - i));
    }
  }
  const std::vector<int8_t> act = normal_activations(M, G, rng);
  const bool narrow = K <= kInt32MaxK;
  std::vector<int32_t> out32(narrow ? M * N : 0);
  std::vector<int64_t> out64(narrow ? 0 : M * N);
  // past the set's GEMV token count, the GEMM, as the driver runs it (the same activation bytes
  // read in its natural layout, which takes the same G * 512 bytes per token: any bytes are valid)
  const bool gemm = !lut && !lut3 && !plain_read && set->int_gemm && M > gemv_max_tokens(bytes, K4);
  std::vector<uint32_t*> scratch(threads, nullptr);
  for (auto& p : scratch)
    if (gemm) p = static_cast<uint32_t*>(std::aligned_alloc(64, (gemm_scratch_bytes(K4) + 63) / 64 * 64));
  const int64_t packed_bytes = !lut && !lut3 && set->packed_bytes ? set->packed_bytes(M, G) : 0;
  uint8_t* packed = packed_bytes ? static_cast<uint8_t*>(std::aligned_alloc(64, (packed_bytes + 63) / 64 * 64)) : nullptr;
  IntArgs base{codes[0], N, K4, G, act.data(), G * 512, M, narrow ? out32.data() : nullptr,
               narrow ? nullptr : out64.data(), nullptr, packed};
  for (int64_t m = 0; packed && m < M; m += kPackTokenBlock)
    set->pack_tokens(base, m, std::min(kPackTokenBlock, M - m), packed);
  int n_sets;
  const KernelSet& lut_set = set->lut_gemv ? *set : kernel_sets(&n_sets)[0];
  std::vector<uint8_t> tables(lut ? M * K4 * kLutTableBytes : 0);
  if (lut) {
    for (int64_t m = 0; m < M; ++m) lut_set.lut_tables(act.data() + m * G * 512, K4, tables.data() + m * K4 * kLutTableBytes);
    base.act = reinterpret_cast<const int8_t*>(tables.data());
    base.act_stride = K4 * kLutTableBytes;
  }
  const KernelSet& lut3_set = set->runs_lut3() ? *set : kernel_sets(&n_sets)[0];
  const int64_t lut3_stride = lut3_table_stride(K4);
  uint8_t* lut3_tables = lut3 ? static_cast<uint8_t*>(std::aligned_alloc(64, M * lut3_stride)) : nullptr;
  if (lut3) {
    for (int64_t m = 0; m < M; ++m) lut3_set.lut3_tables(act.data() + m * G * 512, K4, lut3_tables + m * lut3_stride);
    base.act = reinterpret_cast<const int8_t*>(lut3_tables);
    base.act_stride = lut3_stride;
  }
  // PYQUANT_BENCH_LUT3_TABLES: "once" (the default) makes the tables once, before the calls: the
  // kernel alone; "call" has each thread make all of its call's tables first, in its own buffer,
  // as the driver does (qlinear.cpp); "only" times that making alone, no kernel.
  const char* tables_env = std::getenv("PYQUANT_BENCH_LUT3_TABLES");
  const std::string tables_mode = tables_env ? tables_env : "once";
  if (tables_mode != "once" && tables_mode != "call" && tables_mode != "only") {
    std::fprintf(stderr, "PYQUANT_BENCH_LUT3_TABLES must be once, call or only\n");
    return 2;
  }
  const bool tables_only = tables_mode == "only";
  std::vector<uint8_t*> own_tables(threads, nullptr);
  for (int t = 0; lut3 && tables_mode != "once" && t < threads; ++t)
    own_tables[t] = static_cast<uint8_t*>(std::aligned_alloc(64, M * lut3_stride));
  const IntKernel kernel = lut ? lut_set.lut_gemv : lut3 ? lut3_set.lut3_gemv : gemm ? set->int_gemm : set->int_gemv;
  // (lut3: whole bands or groups per thread, as qlinear.cpp splits them)
  const int64_t align = lut3 ? lut3_call_rows(N, threads) / kRowTile : 1, tiles = (N + kRowTile - 1) / kRowTile;
  const int64_t per = (tiles + threads * align - 1) / (threads * align) * align * kRowTile;
  const int calls = std::max(layers + 200, 2 * layers);
  const auto kernel_ticks = run_threads(threads, calls, [&](int call, int t) {
    IntArgs a = base;
    a.codes = codes[call % layers];
    a.scratch = scratch[t];
    const int64_t n0 = t * per, n1 = std::min(N, n0 + per);
    if (lut3 && own_tables[t]) {  // this thread's own tables, made as the driver makes them
      for (int64_t m = 0; m < M; ++m)
        lut3_set.lut3_tables(act.data() + m * G * 512, K4, own_tables[t] + m * lut3_stride);
      a.act = reinterpret_cast<const int8_t*>(own_tables[t]);
    }
    if (n0 < n1 && plain_read) read_range(a.codes + n0 * K4, (n1 - n0) * K4);
    else if (n0 < n1 && !tables_only) kernel(a, n0, n1);
  });
  const size_t probe = size_t(512) << 20;
  uint8_t* buf = huge_alloc(probe);
  std::memset(buf, 1, probe);
  const auto read_ticks = run_threads(threads, 9, [&](int, int t) {
    read_range(buf + probe / threads * t, probe / threads);
  });
  const double hz = tsc_hz(), kernel_s = median(kernel_ticks, layers) / hz, read_s = median(read_ticks, 1) / hz;
  const double gbs = probe / read_s / 1e9, floor_s = bytes / (gbs * 1e9);
  std::printf("%s%s  %ld x %ld (in x out), %ld tokens, %d threads, %d layers cycled (%.2f MB each)%s\n", set->name,
              lut ? " lut" : lut3 ? (&lut3_set == set ? " lut3" : " lut3 (portable)") : plain_read ? " read" : gemm ? " gemm" : "", long(K), long(N), long(M), threads, layers, bytes / 1e6,
              lut3 ? (", tables " + tables_mode).c_str() : "");
  std::printf("kernel %.1f us (%.1f GB/s of codes)  read %.1f GB/s -> floor %.1f us  kernel / floor %.2f\n",
              kernel_s * 1e6, bytes / kernel_s / 1e9, gbs, floor_s * 1e6, kernel_s / floor_s);
  return 0;
}
