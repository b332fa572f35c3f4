// pyquant CUDA kernels: launcher API shared by the kernel sources (*.cu, compiled by nvcc) and the
// torch bindings (bindings.cpp). Plain pointers only, so the .cu files need no torch headers.
//
// The math (DESIGN.md, "kernel trick"): with x' = H_in(su * x) and, per 4-chunk j,
// xt_j = A^T x'_j, the rotated output is  W_hat x' = w_scale * (sum_j z_j . xt_j + sum_j b . x'_j),
// an unsigned 2-bit dot product plus one constant per token. The kernels feed the levels z (exact
// in bf16) and xt (split into two bf16 limbs, hi + lo) to bf16 tensor cores with fp32
// accumulation, then apply  y = sv * H_out(.) + bias.
//
// Data layouts
// ------------
// codes (repacked once per layer by pyquant/backends/cuda.py:repack_codes), uint4 [Np/32][Kp/64][32]:
//   Np = N rounded up to kRowAlign, Kp = K rounded up to kKAlign, padding codes are level 0.
//   Entry [G][kb][lane] holds, for the 32-row group G and the 64-wide k block kb, the mma A-operand
//   fragments of lane = 4*g + t (g = lane/4, t = lane%4): word w = 2*h + c (h: rows 16h..16h+15,
//   c: k 32c..32c+31); in that word register q = 4*s + r (s: 16-wide k step inside the half,
//   r: fragment register) sits at bits 2q (even k) and 2q+16 (odd k), with
//     row = 32G + 16h + g + 8*(r & 1),   k = 64kb + 32c + 16s + 2t + 8*(r >> 1) + (odd k ? 1 : 0).
//   A warp reads one contiguous 512-byte block per (group, k block) with 128-bit loads.
// act (transformed activations), u32 [tiles of 8 tokens][Kp/16][32 lanes][4]:
//   the mma B-operand fragments: lane = 4*g + t holds, for token 8*tile + g and k step ks,
//   {b0.hi, b1.hi, b0.lo, b1.lo} where b0 = (xt[16ks+2t], xt[16ks+2t+1]) and b1 = the pair 8 further.
// partials, fp32 [splits][M][Np]: split-K partial sums of z . xt + const (const in split 0 only
//   for the GEMM; in every split's own share for the fused small-M kernel).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pyquant_cuda {

constexpr int kMaxHad = 256;    // largest Hadamard block the kernels take (one warp span)
constexpr int kRowAlign = 256;  // Np is a multiple of this
constexpr int kUnitRows = 256;  // rows whose output transform is done together (>= kMaxHad)
constexpr int kKAlign = 64;     // Kp is a multiple of this
constexpr int kSmallMaxM = 8;   // tokens handled by the fused small-batch kernel
constexpr int kTransformSlice = 2048;  // k elements per block of the standalone transform

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct LayerArgs {
  const uint4* codes;     // repacked codes, see above
  const float* su;        // [K]
  const float* sv;        // [N]
  const float* A;         // [4][4] row-major
  const float* b;         // [4]
  const float* w_scale;   // [1], read on the device (no host sync)
  const float* bias;      // [N] or nullptr
  int N, K, Np, Kp, had_in, had_out;  // had_*: 0 or 1 = none, else a power of two <= kMaxHad
};

// ---- 1..8 tokens: one fused kernel (transform + tensor-core GEMV + split-K + output transform) --
struct SmallPlan {
  int slice;          // k elements per CTA (multiple of 64, of had_in, <= 2048)
  int splits;         // ceil(Kp / slice)
  size_t smem_bytes;  // dynamic shared memory per CTA
  bool pdl;           // launch with programmatic stream serialization (sm_90+)
};
SmallPlan plan_small(int M, int Np, int Kp, int num_sms, bool pdl);
// counters: int32 [Np / kUnitRows], zero before the call and zero again after it.
cudaError_t launch_small(DType dt, const void* x, void* y, int M, const LayerArgs& L, const SmallPlan& plan,
                         float* partials, int* counters, cudaStream_t stream);

// ---- more tokens: transform kernel -> tensor-core GEMM -> output kernel ---------------------------
inline int transform_slices(int Kp) { return (Kp + kTransformSlice - 1) / kTransformSlice; }
// act: u32 [ceil(M/8)][Kp/16][32][4]; const_ws: fp32 [transform_slices(Kp)][8*ceil(M/8)]
cudaError_t launch_transform(DType dt, const void* x, int M, const LayerArgs& L, uint32_t* act, float* const_ws,
                             cudaStream_t stream);

struct GemmPlan {
  int tiles_per_warp;  // 8-token tiles per warp (1, 2, 4 or 8); a CTA covers 128 rows x 16*tiles_per_warp tokens
  int splits;          // split-K factor
};
GemmPlan plan_gemm(int M, int Np, int Kp, int num_sms);
cudaError_t launch_gemm(const uint32_t* act, const float* const_ws, int M, const LayerArgs& L, const GemmPlan& plan,
                        float* partials, cudaStream_t stream);
cudaError_t launch_finish(DType dt, const float* partials, int splits, int M, const LayerArgs& L, void* y,
                          cudaStream_t stream);

}  // namespace pyquant_cuda
