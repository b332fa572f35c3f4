// Device helpers shared by the pyquant CUDA kernels (see qlinear_cuda.h for the data layouts).
//
// Everything here needs sm_80 (bf16 mma.sync, cp.async, createpolicy); the Python backend refuses
// older GPUs, and the kernels compile to a trap there so a multi-arch build still links.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "qlinear_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PYQ_ARCH_UNSUPPORTED 1
#endif

namespace pyquant_cuda {

// ---------------------------------------------------------------------------------------------
// Bit casts and element conversion (the torch build defines __CUDA_NO_HALF_CONVERSIONS__ and
// friends, so every conversion below is an explicit intrinsic).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t bf2_bits(__nv_bfloat162 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 bf2_to_float2(uint32_t u) {
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&u);
  return __bfloat1622float2(v);
}
__device__ __forceinline__ float2 h2_to_float2(uint32_t u) {
  __half2 v = *reinterpret_cast<__half2*>(&u);
  return __half22float2(v);
}

// Four consecutive elements (the address is 8-byte aligned for 16-bit types, 16-byte for fp32).
__device__ __forceinline__ void load4(const float* p, float v[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void load4(const __half* p, float v[4]) {
  const uint2 t = *reinterpret_cast<const uint2*>(p);
  const float2 a = h2_to_float2(t.x), b = h2_to_float2(t.y);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float v[4]) {
  const uint2 t = *reinterpret_cast<const uint2*>(p);
  const float2 a = bf2_to_float2(t.x), b = bf2_to_float2(t.y);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------
// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
#ifndef PYQ_ARCH_UNSUPPORTED
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
  d = 0;
#endif
  return d;
}

// D = A * B + D, m16n8k16, bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#ifndef PYQ_ARCH_UNSUPPORTED
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The packed weights are read exactly once per forward: keep them out of L1 and first in line
// for eviction from L2, so the activations and partial sums stay cached.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol = 0;
#ifndef PYQ_ARCH_UNSUPPORTED
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
#endif
  return pol;
}

__device__ __forceinline__ uint4 ldg_stream(const uint4* p, uint64_t pol) {
  uint4 v;
#ifndef PYQ_ARCH_UNSUPPORTED
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
#else
  v = *p;
#endif
  return v;
}

// 16-byte global -> shared copy; src_bytes == 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes, uint64_t pol) {
#ifndef PYQ_ARCH_UNSUPPORTED
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;"
               :: "r"(s), "l"(gmem), "r"(src_bytes), "l"(pol) : "memory");
#endif
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#ifndef PYQ_ARCH_UNSUPPORTED
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef PYQ_ARCH_UNSUPPORTED
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef PYQ_ARCH_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
#endif
}

// Programmatic dependent launch (sm_90+): wait until the grids this one depends on have finished
// and their writes are visible / let dependent grids start launching. Both are no-ops when the
// launch did not opt in (and on older GPUs), so they are always compiled in.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Code unpacking: one repacked 32-bit word -> the eight bf16x2 mma operand registers it holds.
// Register q takes the level pair at bits (2q, 2q+1) [even k] and (2q+16, 2q+17) [odd k].
// Magic number: OR-ing a level z into the mantissa of bf16 128.0 (0x4300) at bit p gives
// 128 + z * 2^p exactly (p <= 4 stays inside the 7-bit mantissa); one fma maps it back to z.
// Two shifts serve all eight registers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void unpack_word(uint32_t w, uint32_t r[8]) {
  constexpr uint32_t kMagic = 0x43004300u;                        // bf16x2 (128, 128)
  constexpr uint32_t kMul0 = 0x3F803F80u, kAdd0 = 0xC300C300u;    // * 1      - 128
  constexpr uint32_t kMul2 = 0x3E803E80u, kAdd2 = 0xC200C200u;    // * 1/4    - 32
  constexpr uint32_t kMul4 = 0x3D803D80u, kAdd4 = 0xC100C100u;    // * 1/16   - 8
  const uint32_t w6 = w >> 6, w12 = w >> 12;
  r[0] = fma_bf16x2(lop3_and_or(w, 0x00030003u, kMagic), kMul0, kAdd0);
  r[1] = fma_bf16x2(lop3_and_or(w, 0x000C000Cu, kMagic), kMul2, kAdd2);
  r[2] = fma_bf16x2(lop3_and_or(w, 0x00300030u, kMagic), kMul4, kAdd4);
  r[3] = fma_bf16x2(lop3_and_or(w6, 0x00030003u, kMagic), kMul0, kAdd0);
  r[4] = fma_bf16x2(lop3_and_or(w6, 0x000C000Cu, kMagic), kMul2, kAdd2);
  r[5] = fma_bf16x2(lop3_and_or(w6, 0x00300030u, kMagic), kMul4, kAdd4);
  r[6] = fma_bf16x2(lop3_and_or(w12, 0x00030003u, kMagic), kMul0, kAdd0);
  r[7] = fma_bf16x2(lop3_and_or(w12, 0x000C000Cu, kMagic), kMul2, kAdd2);
}

// ---------------------------------------------------------------------------------------------
// Fast Walsh-Hadamard transform of blocks of `had` (power of two, 2..kMaxHad) elements, each
// thread holding 8 consecutive elements and the 32 lanes of the warp 256 consecutive ones
// (aligned to 256). Stages below 8 run in registers, the others exchange with shuffles.
// Unnormalised; every lane of the warp must call it.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void fwht8_warp(float v[8], int had) {
#pragma unroll
  for (int h = 1; h < 8; h <<= 1) {
    if (h < had) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (!(i & h)) {
          const float a = v[i], b = v[i + h];
          v[i] = a + b;
          v[i + h] = a - b;
        }
      }
    }
  }
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    if (8 * m < had) {  // uniform across the warp
      const bool upper = (lane & m) != 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float o = __shfl_xor_sync(0xffffffffu, v[i], m);
        v[i] = upper ? (o - v[i]) : (v[i] + o);
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Two bf16 limbs of a pair of fp32 values: hi = bf16(v), lo = bf16(v - hi). hi + lo carries
// ~16 significant bits, so the tensor-core product keeps ~1e-5 relative accuracy while the
// exponent range stays fp32's (no per-token scaling needed).
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  hi = bf2_bits(h);
  lo = bf2_bits(__floats2bfloat162_rn(a - hf.x, b - hf.y));
}

// ---------------------------------------------------------------------------------------------
// Activation transform of 8 consecutive inputs x[k..k+7] (k % 8 == 0) of one token:
//   x' = H_had(su * x) / sqrt(had);  xt = per 4-chunk A^T x';  returns sum over chunks of b . x'.
// Inputs at or beyond K count as zero (they only meet zero codes). `valid == false` makes the
// lane contribute zeros while still taking part in the warp's shuffles.
// hi[p], lo[p]: the bf16x2 limbs of the pair (xt[2p], xt[2p+1]).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float transform8(const T* xrow, int k, int K, bool valid, const float* __restrict__ su,
                                            const float Am[16], const float bv[4], int had, float had_scale,
                                            uint32_t hi[4], uint32_t lo[4]) {
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = 0.f;
  if (valid) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int kq = k + 4 * q;
      if (kq < K) {  // K % 4 == 0, so a 4-chunk is either fully inside or fully outside
        float xv[4], sv[4];
        load4(xrow + kq, xv);
        load4(su + kq, sv);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[4 * q + i] = xv[i] * sv[i];
      }
    }
  }
  if (had > 1) {
    fwht8_warp(v, had);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= had_scale;
  }
  float c = 0.f, t[8];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const float* x = v + 4 * q;
#pragma unroll
    for (int j = 0; j < 4; ++j)  // (A^T x)_j = sum_r A[r][j] x_r
      t[4 * q + j] = x[0] * Am[j] + x[1] * Am[4 + j] + x[2] * Am[8 + j] + x[3] * Am[12 + j];
    c += x[0] * bv[0] + x[1] * bv[1] + x[2] * bv[2] + x[3] * bv[3];
  }
#pragma unroll
  for (int p = 0; p < 4; ++p) split_bf16x2(t[2 * p], t[2 * p + 1], hi[p], lo[p]);
  return c;
}

// ---------------------------------------------------------------------------------------------
// Output transform of rows [row0, row0 + kUnitRows) for tokens [m_begin, m_end):
//   y[m, n] = sv[n] * H_out(w_scale * sum_s partials[s, m, :])[n] / sqrt(had_out) + bias[n]
// Partial sums are summed in split order (deterministic) and read through L2 (.cg): they may
// have been written by other CTAs of the same grid. All threads of the block must call it.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void finish_rows(const float* __restrict__ partials, int splits, int M, int row0, const LayerArgs& L,
                            float had_out_scale, T* __restrict__ y, int m_begin, int m_end) {
  constexpr int kGroups = kUnitRows / 8;
  const float ws = __ldg(L.w_scale);
  const int ntask = (m_end - m_begin) * kGroups;
  for (int base = 0; base < ntask; base += blockDim.x) {  // uniform trip count for the shuffles
    const int task = base + static_cast<int>(threadIdx.x);
    const bool valid = task < ntask;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
    int m = 0, row = 0;
    if (valid) {
      m = m_begin + task / kGroups;
      row = row0 + (task % kGroups) * 8;
      for (int s = 0; s < splits; ++s) {
        const float4* p = reinterpret_cast<const float4*>(partials + (static_cast<size_t>(s) * M + m) * L.Np + row);
        const float4 a = __ldcg(p), b = __ldcg(p + 1);
        v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
        v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] *= ws;
    }
    if (L.had_out > 1) {
      fwht8_warp(v, L.had_out);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] *= had_out_scale;
    }
    if (valid) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int n = row + i;
        if (n < L.N) {
          const float o = v[i] * __ldg(L.sv + n) + (L.bias != nullptr ? __ldg(L.bias + n) : 0.f);
          store1(y + static_cast<size_t>(m) * L.N + n, o);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------
// 1/sqrt(had) for a Hadamard block, 1 when there is none.
inline float inv_sqrt(int had) { return had > 1 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(had))) : 1.f; }

// Kernels using more than 48 KiB of dynamic shared memory must opt in once per device.
template <typename K>
cudaError_t ensure_smem(K kernel, size_t bytes, int (&recorded)[64]) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 64 && recorded[dev] >= static_cast<int>(bytes)) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess && dev < 64) recorded[dev] = static_cast<int>(bytes);
  return e;
}

}  // namespace pyquant_cuda
