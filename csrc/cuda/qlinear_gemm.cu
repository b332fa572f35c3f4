// Batched path (more than 8 tokens): transform kernel -> tensor-core GEMM -> output kernel.
//
// transform_kernel: one CTA per (token, 2048 inputs): su scale + Hadamard (registers and warp
//   shuffles) + A^T per 4-chunk, written as bf16 hi/lo mma B fragments, plus the per-token
//   constant of each slice (summed later in a fixed order).
// gemm_kernel: CTA tile 128 rows x (16 * tiles_per_warp = 16..128) tokens x 64 k per stage, 3-stage cp.async
//   pipeline for both the repacked codes (evict-first) and the activation fragments; 8 warps as
//   4 (rows) x 2 (tokens); codes are unpacked to bf16 in registers with lop3 + magic-number fma
//   and each fragment feeds 2 limbs x tiles_per_warp mma. Optional split-K over grid.z.
// finish_kernel: sum of the splits in order, w_scale, H_out, sv, bias, cast.
#include "qlinear_common.cuh"

namespace pyquant_cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// transform
// ---------------------------------------------------------------------------------------------
constexpr int kTfThreads = kTransformSlice / 8;  // 8 inputs per thread

template <typename T>
__global__ void __launch_bounds__(kTfThreads)
    transform_kernel(const T* __restrict__ x, int M, const LayerArgs L, float had_scale, uint32_t* __restrict__ act,
                     float* __restrict__ const_ws, int Mpad) {
#ifdef PYQ_ARCH_UNSUPPORTED
  __trap();
#else
  __shared__ float s_part[kTfThreads / 32];
  const int m = blockIdx.x, slice = blockIdx.y;
  const int tile = m >> 3, g = m & 7;
  const int k = slice * kTransformSlice + 8 * static_cast<int>(threadIdx.x);
  const bool in_range = k < L.Kp;
  float Am[16], bv[4];
#pragma unroll
  for (int i = 0; i < 16; ++i) Am[i] = __ldg(L.A + i);
#pragma unroll
  for (int i = 0; i < 4; ++i) bv[i] = __ldg(L.b + i);
  uint32_t hi[4], lo[4];
  // Padding tokens (m >= M) of the last 8-token tile are written as zeros.
  const float c = transform8<T>(x + static_cast<size_t>(m < M ? m : 0) * L.K, k, L.K, in_range && m < M, L.su, Am,
                                bv, L.had_in, had_scale, hi, lo);
  if (in_range) {
    uint32_t* dst = act + (static_cast<size_t>(tile * (L.Kp >> 4) + (k >> 4)) * 32 + 4 * g) * 4 + ((k >> 3) & 1);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      dst[4 * t] = hi[t];
      dst[4 * t + 2] = lo[t];
    }
  }
  const float cw = warp_sum(c);
  if ((threadIdx.x & 31) == 0) s_part[threadIdx.x >> 5] = cw;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kTfThreads / 32; ++w) s += s_part[w];
    const_ws[static_cast<size_t>(slice) * Mpad + m] = s;
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------
constexpr int kGemmThreads = 256;
constexpr int kStages = 3;
constexpr int kGemmRows = 128;  // 4 warps x one 32-row group

template <int NT>
struct GemmShape {
  static constexpr int kTiles = 2 * NT;                   // 8-token tiles per CTA
  static constexpr int kStageU4 = 4 * 32 + kTiles * 128;  // codes [4 groups][32] + act [tiles][4 ksteps][32]
  static constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageU4 * 16;
};

template <int NT>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(const uint4* __restrict__ act, const float* __restrict__ const_ws, int nslices, int M, int Mpad,
                const LayerArgs L, int splits, float* __restrict__ partials) {
#ifdef PYQ_ARCH_UNSUPPORTED
  __trap();
#else
  using S = GemmShape<NT>;
  extern __shared__ uint4 smem[];
  const int rb = blockIdx.x, tb = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wr = warp & 3, wc = warp >> 2;
  const int KB = L.Kp >> 6, KS16 = L.Kp >> 4, Mt = Mpad >> 3;
  const int kb_begin = static_cast<int>(static_cast<long long>(KB) * split / splits);
  const int kb_end = static_cast<int>(static_cast<long long>(KB) * (split + 1) / splits);
  const int nk = kb_end - kb_begin;
  const uint64_t pol = evict_first_policy();

  auto load_stage = [&](int st, int kb) {
    uint4* s = smem + st * S::kStageU4;
    if (tid < 128) {  // 4 groups x 512 bytes of codes
      const int gi = tid >> 5, l = tid & 31;
      cp_async16(s + tid, L.codes + (static_cast<size_t>(rb * 4 + gi) * KB + kb) * 32 + l, 16, pol);
    }
#pragma unroll
    for (int piece = tid; piece < S::kTiles * 128; piece += kGemmThreads) {
      const int tl = piece >> 7, rem = piece & 127;  // rem = kstep * 32 + lane
      const int tile = tb * S::kTiles + tl;
      const bool ok = tile < Mt;  // tiles past the last token are zero-filled
      const uint4* src = ok ? act + (static_cast<size_t>(tile) * KS16 + kb * 4) * 32 + rem : act;
      cp_async16(s + 128 + piece, src, ok ? 16 : 0);
    }
  };

  float acc[2][NT][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[h][j][e] = 0.f;

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nk) load_stage(st, kb_begin + st);
    cp_async_commit();  // one group per stage, possibly empty: keeps the wait count uniform
  }
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for everyone; stage i-1 is free to refill
    if (i + kStages - 1 < nk) load_stage((i + kStages - 1) % kStages, kb_begin + i + kStages - 1);
    cp_async_commit();

    const uint4* s = smem + (i % kStages) * S::kStageU4;
    const uint4 wq = s[wr * 32 + lane];
    const uint4* sa = s + 128 + wc * NT * 128;
    const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      uint32_t r0[8], r1[8];
      unpack_word(words[c], r0);      // rows 0..15 of the warp's group
      unpack_word(words[2 + c], r1);  // rows 16..31
#pragma unroll
      for (int s2 = 0; s2 < 2; ++s2) {
        const int kstep = 2 * c + s2;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 bf = sa[j * 128 + kstep * 32 + lane];
          mma_bf16_16816(acc[0][j], r0 + 4 * s2, bf.x, bf.y);
          mma_bf16_16816(acc[0][j], r0 + 4 * s2, bf.z, bf.w);
          mma_bf16_16816(acc[1][j], r1 + 4 * s2, bf.x, bf.y);
          mma_bf16_16816(acc[1][j], r1 + 4 * s2, bf.z, bf.w);
        }
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  const int row_base = rb * kGemmRows + wr * 32;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int tile = tb * S::kTiles + wc * NT + j;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = tile * 8 + 2 * t + e;
      if (tok < M) {
        float cst = 0.f;
        if (split == 0)
          for (int sl = 0; sl < nslices; ++sl) cst += __ldg(const_ws + static_cast<size_t>(sl) * Mpad + tok);
        float* out = partials + (static_cast<size_t>(split) * M + tok) * L.Np + row_base;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          out[16 * h + g] = acc[h][j][e] + cst;
          out[16 * h + g + 8] = acc[h][j][2 + e] + cst;
        }
      }
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// output transform
// ---------------------------------------------------------------------------------------------
constexpr int kFinishThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const float* __restrict__ partials, int splits, int M, const LayerArgs L, float had_out_scale,
                  T* __restrict__ y) {
#ifdef PYQ_ARCH_UNSUPPORTED
  __trap();
#else
  const int m0 = blockIdx.y * 8;
  finish_rows<T>(partials, splits, M, blockIdx.x * kUnitRows, L, had_out_scale, y, m0, min(M, m0 + 8));
#endif
}

template <typename T>
cudaError_t launch_transform_t(const void* x, int M, const LayerArgs& L, uint32_t* act, float* const_ws,
                               cudaStream_t stream) {
  const int Mpad = 8 * ((M + 7) / 8);
  const dim3 grid(Mpad, transform_slices(L.Kp));
  transform_kernel<T><<<grid, kTfThreads, 0, stream>>>(static_cast<const T*>(x), M, L, inv_sqrt(L.had_in), act,
                                                       const_ws, Mpad);
  return cudaGetLastError();
}

template <int NT>
cudaError_t launch_gemm_t(const uint32_t* act, const float* const_ws, int M, const LayerArgs& L, int splits,
                          float* partials, cudaStream_t stream) {
  using S = GemmShape<NT>;
  static int recorded[64] = {0};
  cudaError_t e = ensure_smem(gemm_kernel<NT>, S::kSmemBytes, recorded);
  if (e != cudaSuccess) return e;
  const int Mt = (M + 7) / 8;
  const dim3 grid(L.Np / kGemmRows, (Mt + S::kTiles - 1) / S::kTiles, splits);
  gemm_kernel<NT><<<grid, kGemmThreads, S::kSmemBytes, stream>>>(
      reinterpret_cast<const uint4*>(act), const_ws, transform_slices(L.Kp), M, 8 * Mt, L, splits, partials);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_finish_t(const float* partials, int splits, int M, const LayerArgs& L, void* y,
                            cudaStream_t stream) {
  const dim3 grid(L.Np / kUnitRows, (M + 7) / 8);
  finish_kernel<T><<<grid, kFinishThreads, 0, stream>>>(partials, splits, M, L, inv_sqrt(L.had_out),
                                                         static_cast<T*>(y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_transform(DType dt, const void* x, int M, const LayerArgs& L, uint32_t* act, float* const_ws,
                             cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return launch_transform_t<float>(x, M, L, act, const_ws, stream);
    case DType::kFloat16: return launch_transform_t<__half>(x, M, L, act, const_ws, stream);
    case DType::kBFloat16: return launch_transform_t<__nv_bfloat16>(x, M, L, act, const_ws, stream);
  }
  return cudaErrorInvalidValue;
}

GemmPlan plan_gemm(int M, int Np, int Kp, int num_sms) {
  GemmPlan plan;
  // Token tile (16 * tiles_per_warp) no larger than needed: zero columns cost full tensor work.
  plan.tiles_per_warp = M > 64 ? 8 : M > 32 ? 4 : M > 16 ? 2 : 1;
  const int Mt = (M + 7) / 8;
  const long ctas = static_cast<long>(Np / kGemmRows) * ((Mt + 2 * plan.tiles_per_warp - 1) / (2 * plan.tiles_per_warp));
  const int KB = Kp / 64;
  // Split K while the grid is under two waves and every split keeps >= 8 k blocks (512 inputs).
  int splits = 1;
  while (ctas * splits < 2L * num_sms && KB / (2 * splits) >= 8) splits *= 2;
  plan.splits = splits;
  return plan;
}

cudaError_t launch_gemm(const uint32_t* act, const float* const_ws, int M, const LayerArgs& L, const GemmPlan& plan,
                        float* partials, cudaStream_t stream) {
  switch (plan.tiles_per_warp) {
    case 1: return launch_gemm_t<1>(act, const_ws, M, L, plan.splits, partials, stream);
    case 2: return launch_gemm_t<2>(act, const_ws, M, L, plan.splits, partials, stream);
    case 4: return launch_gemm_t<4>(act, const_ws, M, L, plan.splits, partials, stream);
    case 8: return launch_gemm_t<8>(act, const_ws, M, L, plan.splits, partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_finish(DType dt, const float* partials, int splits, int M, const LayerArgs& L, void* y,
                          cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return launch_finish_t<float>(partials, splits, M, L, y, stream);
    case DType::kFloat16: return launch_finish_t<__half>(partials, splits, M, L, y, stream);
    case DType::kBFloat16: return launch_finish_t<__nv_bfloat16>(partials, splits, M, L, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyquant_cuda
