// Fused kernel for 1..8 tokens (decode): one launch per layer.
//
// Grid: (splits, Np / 256). A CTA owns 256 output rows (8 warps x one 32-row group) and one k slice.
//  1. Each warp issues 128-bit evict-first loads for its first 8 k blocks of codes (its whole share
//     of the weight stream is independent of the activations, so the loads fly during step 2).
//  2. All threads transform the slice of the M activation rows (su scale, Hadamard, A^T, bf16
//     hi/lo limbs) into shared memory, in mma B-fragment order, and the slice's per-token constant.
//  3. Tensor-core GEMV: per 16-wide k step, one shared-memory load of the token fragments feeds
//     four m16n8k16 mma (2 row halves x 2 limbs); codes are double-buffered in registers.
//  4. The CTA writes its partial sums; the last CTA of the row block (an atomic counter, reset
//     afterwards) sums the splits in a fixed order and applies w_scale, H_out, sv, bias.
// No host synchronisation, deterministic, CUDA-graph capturable.
#include "qlinear_common.cuh"

namespace pyquant_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // one 32-row group each: kWarps * 32 == kUnitRows
constexpr int kChunk = 8;              // k blocks of 64 per register buffer (two buffers)
constexpr int kMaxSlice = 2048;
static_assert(kWarps * 32 == kUnitRows, "a CTA covers exactly one output-transform unit");

struct SmallParams {
  const void* x;
  void* y;
  int M;
  LayerArgs L;
  float* partials;
  int* counters;
  int slice;
  int splits;
  float had_in_scale;
  float had_out_scale;
};

__device__ __forceinline__ void load_chunk(uint4 (&buf)[kChunk], const uint4* p, int first, int nkb, uint64_t pol) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    if (first + i < nkb) buf[i] = ldg_stream(p + static_cast<size_t>(first + i) * 32, pol);
}

// acc[h] += rows (16h..16h+15 of the warp's group) x fragment columns, over the k blocks in `buf`.
// kPacked (M <= 4): the 8 mma columns are (hi limb of tokens 0..3, lo limb of tokens 0..3), one
//   mma per k step and row half; the two limbs are added in the epilogue with a lane shuffle.
// otherwise: the columns are tokens 0..7, one mma per limb.
template <bool kPacked>
__device__ __forceinline__ void mma_chunk(const uint4 (&buf)[kChunk], int first, int nkb, const uint32_t* actw,
                                          int M, int lane, float (&acc)[2][4]) {
  const int lanes_m = 4 * M;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    if (first + i < nkb) {
      const int kb = first + i;
      const uint32_t words[4] = {buf[i].x, buf[i].y, buf[i].z, buf[i].w};
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        uint32_t r0[8], r1[8];
        unpack_word(words[c], r0);      // rows 0..15 of the group
        unpack_word(words[2 + c], r1);  // rows 16..31
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const int kstep = kb * 4 + 2 * c + s;
          if (kPacked) {
            // column g: token g & 3, limb g >> 2 (words 0-1 hi, 2-3 lo); absent tokens feed zeros
            uint2 bf = make_uint2(0u, 0u);
            if ((g & 3) < M)
              bf = *reinterpret_cast<const uint2*>(actw + (kstep * lanes_m + 4 * (g & 3) + t) * 4 + 2 * (g >> 2));
            mma_bf16_16816(acc[0], r0 + 4 * s, bf.x, bf.y);
            mma_bf16_16816(acc[1], r1 + 4 * s, bf.x, bf.y);
          } else {
            uint4 bf = make_uint4(0u, 0u, 0u, 0u);
            if (lane < lanes_m) bf = reinterpret_cast<const uint4*>(actw)[kstep * lanes_m + lane];
            mma_bf16_16816(acc[0], r0 + 4 * s, bf.x, bf.y);
            mma_bf16_16816(acc[0], r0 + 4 * s, bf.z, bf.w);
            mma_bf16_16816(acc[1], r1 + 4 * s, bf.x, bf.y);
            mma_bf16_16816(acc[1], r1 + 4 * s, bf.z, bf.w);
          }
        }
      }
    }
  }
}

template <typename T, bool kPacked>
__global__ void __launch_bounds__(kThreads) small_kernel(const SmallParams p) {
#ifdef PYQ_ARCH_UNSUPPORTED
  __trap();
#else
  extern __shared__ uint4 smem[];
  __shared__ float s_const[kSmallMaxM];
  __shared__ int s_last;

  const LayerArgs& L = p.L;
  const int split = blockIdx.x, rb = blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int M = p.M;
  const int k0 = split * p.slice;
  const int len = min(p.slice, L.Kp - k0);  // multiple of 64
  const int nkb = len >> 6;
  const int group = rb * kWarps + warp;
  const uint4* wp = L.codes + (static_cast<size_t>(group) * (L.Kp >> 6) + (k0 >> 6)) * 32 + lane;
  const uint64_t pol = evict_first_policy();

  // 1. start the weight stream; the codes do not depend on the previous kernel, everything
  //    after grid_dependency_wait() may (x, and the counters/partials of a previous call)
  uint4 bufA[kChunk], bufB[kChunk];
  load_chunk(bufA, wp, 0, nkb, pol);
  grid_dependency_wait();

  // 2. activation transform of this slice: smem = act [len/16][4M] uint4, then cpart [M * len/8]
  const int lanes_m = 4 * M;
  uint32_t* actw = reinterpret_cast<uint32_t*>(smem);
  float* cpart = reinterpret_cast<float*>(smem + static_cast<size_t>(p.slice >> 4) * lanes_m);
  const int L8 = len >> 3;
  {
    float Am[16], bv[4];
#pragma unroll
    for (int i = 0; i < 16; ++i) Am[i] = __ldg(L.A + i);
#pragma unroll
    for (int i = 0; i < 4; ++i) bv[i] = __ldg(L.b + i);
    const T* x = static_cast<const T*>(p.x);
    const int ntask = M * L8;  // one task = 8 consecutive inputs of one token
    // Lanes of a warp take consecutive tasks; L8 is a multiple of had_in/8, so every Hadamard
    // block lies inside one token row and one aligned group of lanes.
    for (int base = 0; base < ntask; base += kThreads) {
      const int task = base + tid;
      const bool valid = task < ntask;
      const int m = valid ? task / L8 : 0;
      const int i8 = valid ? task - m * L8 : 0;
      uint32_t hi[4], lo[4];
      const float c = transform8<T>(x + static_cast<size_t>(m) * L.K, k0 + 8 * i8, L.K, valid, L.su, Am, bv,
                                    L.had_in, p.had_in_scale, hi, lo);
      if (valid) {
        // inputs 8*i8 .. 8*i8+7 are k step i8/2, fragment register b0 (i8 even) or b1 (odd),
        // pairs t = 0..3 -> lanes 4m + t
        uint32_t* dst = actw + (static_cast<size_t>((i8 >> 1) * lanes_m + 4 * m) * 4 + (i8 & 1));
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          dst[4 * t] = hi[t];
          dst[4 * t + 2] = lo[t];
        }
        cpart[task] = c;
      }
    }
  }
  __syncthreads();
  for (int m = warp; m < M; m += kWarps) {  // fixed summation order: deterministic
    float c = 0.f;
    for (int j = lane; j < L8; j += 32) c += cpart[m * L8 + j];
    c = warp_sum(c);
    if (lane == 0) s_const[m] = c;
  }
  __syncthreads();

  // 3. tensor-core GEMV over the slice, codes double-buffered in registers
  float acc[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[h][e] = 0.f;
  for (int first = 0; first < nkb; first += 2 * kChunk) {
    if (first + kChunk < nkb) load_chunk(bufB, wp, first + kChunk, nkb, pol);
    mma_chunk<kPacked>(bufA, first, nkb, actw, M, lane, acc);
    if (first + kChunk < nkb) {
      if (first + 2 * kChunk < nkb) load_chunk(bufA, wp, first + 2 * kChunk, nkb, pol);
      mma_chunk<kPacked>(bufB, first + kChunk, nkb, actw, M, lane, acc);
    }
  }

  grid_launch_dependents();  // the next layer may start prefetching its codes

  // 4. partial sums (+ this slice's constant), then the last CTA of the row block finishes it.
  // Accumulator e of lane (g, t): row g + 8 (e >> 1), column 2t + (e & 1).
  const int g = lane >> 2, t = lane & 3;
  if (kPacked) {
    // columns 4..7 (lanes t = 2, 3) hold the lo limbs of the tokens in columns 0..3 (t = 0, 1)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], 2);
  }
  const int row_base = rb * kUnitRows + warp * 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = 2 * t + (e & 1);
      const int row = row_base + 16 * h + g + 8 * (e >> 1);
      if (tok < M && (!kPacked || t < 2))
        p.partials[(static_cast<size_t>(split) * M + tok) * L.Np + row] = acc[h][e] + s_const[tok];
    }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(p.counters + rb, 1) == p.splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  finish_rows<T>(p.partials, p.splits, M, rb * kUnitRows, L, p.had_out_scale, static_cast<T*>(p.y), 0, M);
  if (tid == 0) p.counters[rb] = 0;  // ready for the next call (and the next graph replay)
#endif
}

template <typename T, bool kPacked>
cudaError_t launch_small_tp(const SmallParams& p, const SmallPlan& plan, cudaStream_t stream) {
  static int recorded[64] = {0};
  cudaError_t e = ensure_smem(small_kernel<T, kPacked>, plan.smem_bytes, recorded);
  if (e != cudaSuccess) return e;
  const dim3 grid(plan.splits, p.L.Np / kUnitRows);
  if (plan.pdl) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = plan.smem_bytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, small_kernel<T, kPacked>, p);
  }
  small_kernel<T, kPacked><<<grid, kThreads, plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_small_t(const SmallParams& p, const SmallPlan& plan, cudaStream_t stream) {
  return p.M <= 4 ? launch_small_tp<T, true>(p, plan, stream) : launch_small_tp<T, false>(p, plan, stream);
}

}  // namespace

SmallPlan plan_small(int M, int Np, int Kp, int num_sms, bool pdl) {
  // Enough CTAs to cover the GPU twice, but slices of at least 512 so the per-CTA activation
  // transform stays small next to the 256 x slice codes it serves.
  const long rowblocks = Np / kUnitRows;
  int slice = kMaxSlice;
  while (slice > 512 && rowblocks * ((Kp + slice - 1) / slice) < 2L * num_sms) slice >>= 1;
  if (slice > Kp) slice = Kp;  // a single split; Kp is a multiple of 64 and of had_in
  SmallPlan plan;
  plan.slice = slice;
  plan.splits = (Kp + slice - 1) / slice;
  plan.smem_bytes = static_cast<size_t>(slice / 16) * 4 * M * 16 + static_cast<size_t>(M) * (slice / 8) * 4;
  plan.pdl = pdl;
  return plan;
}

cudaError_t launch_small(DType dt, const void* x, void* y, int M, const LayerArgs& L, const SmallPlan& plan,
                         float* partials, int* counters, cudaStream_t stream) {
  if (M < 1 || M > kSmallMaxM) return cudaErrorInvalidValue;
  SmallParams p;
  p.x = x;
  p.y = y;
  p.M = M;
  p.L = L;
  p.partials = partials;
  p.counters = counters;
  p.slice = plan.slice;
  p.splits = plan.splits;
  p.had_in_scale = inv_sqrt(L.had_in);
  p.had_out_scale = inv_sqrt(L.had_out);
  switch (dt) {
    case DType::kFloat32: return launch_small_t<float>(p, plan, stream);
    case DType::kFloat16: return launch_small_t<__half>(p, plan, stream);
    case DType::kBFloat16: return launch_small_t<__nv_bfloat16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyquant_cuda
