// The kernel sets this build holds, one row per instruction set: a new one is its kernel file
// (kernels_<isa>.cpp, implementing kernel_api.h), its row in kernel_table.cpp and its file in
// setup.py's per-architecture list. Plain C++ (no torch): the standalone harness
// (csrc/cpu/harness/kernel_check.cpp) runs every row against the portable one.
#pragma once

#include "kernel_api.h"
#include "transform.h"

namespace pyquant {
namespace cpu {

using IntKernel = void (*)(const IntArgs&, int64_t n0, int64_t n1);
using FloatKernel = void (*)(const FloatArgs&, int64_t n0, int64_t n1);

struct KernelSet {
  const char* name;           // what set_isa / PYQUANT_CPU_ISA take
  bool (*supported)();        // whether this CPU runs it (checked at run time)
  IntKernel int_gemv;         // plane layout, any number of tokens
  IntKernel int_gemm;         // natural layout, for many tokens (kGemvMaxTokens); null: the GEMV for all
  FloatKernel float_gemv;     // plane layout
  const TransformOps* math;   // the per-token math it runs with (every build gives the same bits)
  int64_t (*serial_work)(int64_t M);  // int mode: one thread below this many multiply-adds; null: kSerialWork
  // int mode: the GEMV's operands made once per call from the plane layout (kernel_api.h's
  // amx_packed_bytes / amx_pack_tokens, passed as IntArgs::packed); null: the GEMV reads the plane layout
  int64_t (*packed_bytes)(int64_t M, int64_t G);
  void (*pack_tokens)(const IntArgs& a, int64_t m0, int64_t mt, uint8_t* packed);
  // mode "lut" (kernel_api.h's table-lookup kernels): the GEMV on LUT-layout codes and the tables
  // it reads; null: the portable set's (same integers)
  IntKernel lut_gemv;
  LutTables lut_tables;
  // Whether mode "auto" (the default) is "lut" on this set rather than "int": where its lut kernel
  // was measured faster than its int kernels at every batch size and its 14-bit activations cost
  // nothing that matters next to the 2-bit weights (AVX2 EPYC: 1.5-2.6x the int kernels, decode
  // 2x; llvm-mca puts the one-token lut loop at 1.3-1.8x the int GEMV's products per cycle on
  // Haswell to Alder Lake and Zen 1-3). Unmeasured sets keep int.
  bool lut_by_default = false;
  // mode "lut3" (kernel_api.h's triple-lookup kernels), where lut3_supported() (the instructions
  // past the set's own: AVX-512 VBMI2); null, or not supported: the portable set's (same integers)
  IntKernel lut3_gemv = nullptr;
  LutTables lut3_tables = nullptr;
  bool (*lut3_supported)() = nullptr;
  // mode lut3 on this set's GEMM (int_gemm): the activations cut to q3 (kernel_api.h); null: the
  // portable one
  Lut3Requantize lut3_requantize = nullptr;
  // Whether mode "auto" is "lut3" on this CPU for a layer of kSmallLayerCodeBytes (1 MB) of codes
  // or more, where runs_lut3() (null: never): on such layers lut3 was 1.0-1.6x the int kernels at
  // 1-32 tokens and 0.97-1.03x at 128 (the same GEMM), while on MiniLM's, a tenth of that, it was
  // 0.93-1.46x (Zen 4, README "Mode lut3"). Intel CPUs keep int (kernel_table.cpp), as does the amx
  // set, whose tiles take the int GEMV from 3 tokens on.
  bool (*lut3_by_default)() = nullptr;
  // whether this set runs lut3 kernels of its own on this CPU
  bool runs_lut3() const { return lut3_gemv && lut3_supported && lut3_supported(); }
};

// This build's kernel sets, slowest first; the first is the portable one, which runs everywhere.
const KernelSet* kernel_sets(int* count);

// The last (fastest) set this CPU supports.
const KernelSet& best_kernel_set();

// The set called `name` if this build has it, else null.
const KernelSet* find_kernel_set(const char* name);

}  // namespace cpu
}  // namespace pyquant
