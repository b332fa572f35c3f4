// The kernel table (kernel_table.h): which kernel sets this build compiled, and which this CPU runs.
#include "kernel_table.h"

#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pyquant {
namespace cpu {
namespace {

bool always() { return true; }

#if defined(__x86_64__)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
bool has_avx512_vbmi2() {
  __builtin_cpu_init();
  return has_avx512_vnni() && __builtin_cpu_supports("avx512vbmi2");
}
// lut3 is the default (KernelSet::lut3_by_default, where the set runs its own lut3 kernel) only
// where it was measured faster: on AMD (Zen 4). No Intel CPU with VBMI2 has run it; llvm-mca 14's
// icelake-server model puts its loop at 38.8 products per cycle against the int GEMV's 17.9 (gcc
// 12's code), so it may pay there too.
bool is_amd() {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
}
// AMX also needs the kernel's consent: Linux enables the 8 KB tile state per process, on request
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), and kills a process that uses the tiles
// without it. Asked once; a refusal (an old kernel, a hypervisor that hides the state) means no AMX.
bool has_amx() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!has_avx512_vnni() || !__builtin_cpu_supports("gfni") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-int8"))
      return false;
#if defined(__linux__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}
#endif

const KernelSet kSets[] = {
    {"scalar", always, int_plane_scalar, nullptr, float_plane_scalar, &kPortableMath, nullptr, nullptr, nullptr,
     lut_gemv_scalar, lut_tables_scalar, false, lut3_gemv_scalar, lut3_tables_scalar, always},
#if defined(__x86_64__)
    {"avx2", has_avx2, int_plane_avx2, nullptr, float_plane_avx2, &kAvx2Math, nullptr, nullptr, nullptr,
     lut_gemv_avx2, lut_tables_avx2, /*lut_by_default=*/true},
    // (the AVX-512 sets build their LUT tables with the AVX2 builder: every such CPU has AVX2)
    {"avx512", has_avx512_vnni, int_plane_avx512, int_gemm_avx512, float_plane_avx512, &kAvx512Math, nullptr,
     nullptr, nullptr, lut_gemv_avx512, lut_tables_avx2, false, lut3_gemv_avx512, lut3_tables_avx512, has_avx512_vbmi2,
     lut3_requantize_avx512, /*lut3_by_default=*/is_amd},
    {"amx", has_amx, int_plane_amx, nullptr, float_plane_avx512, &kAvx512Math, amx_serial_work,
     amx_packed_bytes, amx_pack_tokens, lut_gemv_avx512, lut_tables_avx2, false, lut3_gemv_avx512, lut3_tables_avx512,
     has_avx512_vbmi2},
#endif
#if defined(__aarch64__)
    // Advanced SIMD is part of the AArch64 base architecture: every such CPU has it.
    {"neon", always, int_plane_neon, nullptr, float_plane_neon, &kPortableMath, nullptr, nullptr, nullptr,
     lut_gemv_neon, lut_tables_neon},
#endif
};
constexpr int kNumSets = sizeof(kSets) / sizeof(kSets[0]);

}  // namespace

const KernelSet* kernel_sets(int* count) {
  *count = kNumSets;
  return kSets;
}

const KernelSet& best_kernel_set() {
  static const KernelSet* best = [] {
    const KernelSet* b = &kSets[0];
    for (const auto& s : kSets)
      if (s.supported()) b = &s;
    return b;
  }();
  return *best;
}

const KernelSet* find_kernel_set(const char* name) {
  for (const auto& s : kSets)
    if (std::strcmp(s.name, name) == 0) return &s;
  return nullptr;
}

}  // namespace cpu
}  // namespace pyquant
