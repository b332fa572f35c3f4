// torch bindings of the pyquant CUDA kernels: ops added to the `pyquant` library (whose schemas
// start in csrc/cpu/module.cpp) as torch.ops.pyquant.cuda_linear / cuda_transform, CUDA
// implementations only; their fake (shape) implementations are registered from Python in
// pyquant/ops.py so torch.compile and torch.export trace through them.
// The Python module itself (pyquant._C_cuda) is empty: importing it loads the ops.
//
// No op reads device memory on the host or synchronises; scratch tensors come from the caching
// allocator on the current stream, so the ops can be captured in CUDA graphs.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>

#include "qlinear_cuda.h"

namespace pyquant_cuda {
namespace {

bool is_pow2_block(int64_t h) { return h == 0 || (h > 0 && (h & (h - 1)) == 0); }

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

int num_sms(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

// PYQUANT_CUDA_PDL=1: launch the fused small-batch kernel with programmatic dependent launch on
// sm_90+, so it prefetches its codes while the previous kernel drains (read at every call, so a
// benchmark can compare both in one process).
bool use_pdl(int device) {
  const char* env = std::getenv("PYQUANT_CUDA_PDL");
  if (env == nullptr || env[0] != '1') return false;
  static int major[64] = {0};
  if (device < 0 || device >= 64) return false;
  if (major[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device));
  return major[device] >= 9;
}

void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "pyquant_cuda: ", what, " failed: ", cudaGetErrorString(e));
}

void check_vec(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.numel() == n, name, " must be a contiguous tensor of ", n,
                    " elements, got shape ", t.sizes());
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be a 2-D tensor [M, K], got shape ", x.sizes());
  dtype_of(x);
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(1) % 4 == 0, "x.shape[1] (K) must be a positive multiple of 4, got ",
                    x.size(1));
}

// x as the kernels read it: contiguous rows, 4 inputs per load (16 bytes for fp32, 8 for 16-bit
// types). A view that is not (a strided slice, an odd storage offset) is copied here rather than
// in Python: the copy decision then needs no data pointer or storage offset at trace time, which
// torch.compile cannot give (an H200 run broke the fullgraph trace on x.storage_offset()).
at::Tensor kernel_input(const at::Tensor& x) {
  const uintptr_t align = x.scalar_type() == at::kFloat ? 16 : 8;
  if (x.is_contiguous() && reinterpret_cast<uintptr_t>(x.data_ptr()) % align == 0) return x;
  return x.clone(at::MemoryFormat::Contiguous);  // the caching allocator's blocks are 512-byte aligned
}

// Validates the weight tensors against x and returns the kernels' view of them.
LayerArgs make_layer(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& su, const at::Tensor& sv,
                     const at::Tensor& A, const at::Tensor& b, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, int64_t N, int64_t had_in, int64_t had_out) {
  check_x(x);
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(N > 0, "N must be positive, got ", N);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kInt, "codes must be the int32 repacked codes, got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(codes.device() == x.device(), "codes is on ", codes.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(codes.dim() == 4 && codes.size(2) == 32 && codes.size(3) == 4 && codes.is_contiguous(),
                    "codes must be contiguous [Np/32, Kp/64, 32, 4], got shape ", codes.sizes());
  const int64_t Np = codes.size(0) * 32, Kp = codes.size(1) * 64;
  TORCH_CHECK_VALUE(Kp == (K + kKAlign - 1) / kKAlign * kKAlign, "codes cover K = ", Kp, " but x has K = ", K);
  TORCH_CHECK_VALUE(Np == (N + kRowAlign - 1) / kRowAlign * kRowAlign, "codes cover ", Np, " rows, N = ", N);
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0, "codes must be 16-byte aligned");
  check_vec(su, "su", K, x);
  check_vec(sv, "sv", N, x);
  check_vec(A, "A", 16, x);
  check_vec(b, "b", 4, x);
  check_vec(w_scale, "w_scale", 1, x);
  if (bias.has_value()) check_vec(*bias, "bias", N, x);
  TORCH_CHECK_VALUE(is_pow2_block(had_in) && had_in <= kMaxHad && (had_in == 0 || K % had_in == 0),
                    "had_in must be 0 or a power of two <= ", kMaxHad, " dividing K = ", K, ", got ", had_in);
  TORCH_CHECK_VALUE(is_pow2_block(had_out) && had_out <= kMaxHad && (had_out == 0 || N % had_out == 0),
                    "had_out must be 0 or a power of two <= ", kMaxHad, " dividing N = ", N, ", got ", had_out);
  LayerArgs L;
  L.codes = reinterpret_cast<const uint4*>(codes.data_ptr());
  L.su = su.data_ptr<float>();
  L.sv = sv.data_ptr<float>();
  L.A = A.data_ptr<float>();
  L.b = b.data_ptr<float>();
  L.w_scale = w_scale.data_ptr<float>();
  L.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  L.N = static_cast<int>(N);
  L.K = static_cast<int>(K);
  L.Np = static_cast<int>(Np);
  L.Kp = static_cast<int>(Kp);
  L.had_in = static_cast<int>(had_in);
  L.had_out = static_cast<int>(had_out);
  return L;
}

// y = layer(x) for 1..8 tokens, one fused kernel. `counters` (int32, >= Np/256 zeros) is scratch
// that every call leaves at zero.
at::Tensor linear_small(const at::Tensor& x, const LayerArgs& L, const at::Tensor& counters) {
  const int64_t M = x.size(0), N = L.N;
  TORCH_CHECK_VALUE(M <= kSmallMaxM, "linear_small takes at most ", kSmallMaxM, " tokens, got ", M);
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kInt, "counters must be int32, got ", counters.scalar_type());
  TORCH_CHECK_VALUE(counters.device() == x.device() && counters.is_contiguous() &&
                        counters.numel() >= L.Np / kUnitRows,
                    "counters must be a contiguous int32 tensor of >= ", L.Np / kUnitRows, " elements on ",
                    x.device());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const SmallPlan plan =
      plan_small(static_cast<int>(M), L.Np, L.Kp, num_sms(x.get_device()), use_pdl(x.get_device()));
  at::Tensor partials = at::empty({plan.splits, M, static_cast<int64_t>(L.Np)}, x.options().dtype(at::kFloat));
  check_launch(launch_small(dtype_of(x), x.data_ptr(), y.data_ptr(), static_cast<int>(M), L, plan,
                            partials.data_ptr<float>(), counters.data_ptr<int>(),
                            c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "linear_small kernel launch");
  return y;
}

// y = layer(x) for any number of tokens: transform, tensor-core GEMM, output transform.
at::Tensor linear_gemm(const at::Tensor& x, const LayerArgs& L) {
  const int64_t M = x.size(0), N = L.N;
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int64_t Mt = (M + 7) / 8;
  at::Tensor act = at::empty({Mt, L.Kp / 16, 32, 4}, x.options().dtype(at::kInt));
  at::Tensor const_ws = at::empty({transform_slices(L.Kp), 8 * Mt}, x.options().dtype(at::kFloat));
  check_launch(launch_transform(dtype_of(x), x.data_ptr(), static_cast<int>(M), L,
                                reinterpret_cast<uint32_t*>(act.data_ptr()), const_ws.data_ptr<float>(), stream),
               "transform kernel launch");
  const GemmPlan plan = plan_gemm(static_cast<int>(M), L.Np, L.Kp, num_sms(x.get_device()));
  at::Tensor partials = at::empty({plan.splits, M, static_cast<int64_t>(L.Np)}, x.options().dtype(at::kFloat));
  check_launch(launch_gemm(reinterpret_cast<const uint32_t*>(act.data_ptr()), const_ws.data_ptr<float>(),
                           static_cast<int>(M), L, plan, partials.data_ptr<float>(), stream),
               "gemm kernel launch");
  check_launch(launch_finish(dtype_of(x), partials.data_ptr<float>(), plan.splits, static_cast<int>(M), L,
                             y.data_ptr(), stream),
               "output kernel launch");
  return y;
}

// The op: the fused small-batch kernel up to `small_max_m` tokens (at most kSmallMaxM), the GEMM
// path above. `counters` is the small kernel's split-K scratch: it must hold zeros, and every call
// leaves it so; it is declared as written (Tensor(a!)) because the kernel does write it.
at::Tensor cuda_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& su, const at::Tensor& sv,
                       const at::Tensor& A, const at::Tensor& b, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias, at::Tensor& counters, int64_t N, int64_t had_in,
                       int64_t had_out, int64_t small_max_m) {
  const LayerArgs L = make_layer(x, codes, su, sv, A, b, w_scale, bias, N, had_in, had_out);
  const at::Tensor xk = kernel_input(x);
  if (xk.size(0) <= std::min<int64_t>(small_max_m, kSmallMaxM)) return linear_small(xk, L, counters);
  return linear_gemm(xk, L);
}

// The activation transform alone (for tests): act int32 [ceil(M/8), Kp/16, 32, 4] holding the
// bf16 hi/lo fragments, const_ws fp32 [slices, 8*ceil(M/8)] whose column sums are the constants.
std::tuple<at::Tensor, at::Tensor> transform(const at::Tensor& x, const at::Tensor& su, const at::Tensor& A,
                                             const at::Tensor& b, int64_t had_in) {
  check_x(x);
  const at::Tensor xk = kernel_input(x);
  const int64_t M = x.size(0), K = x.size(1);
  check_vec(su, "su", K, x);
  check_vec(A, "A", 16, x);
  check_vec(b, "b", 4, x);
  TORCH_CHECK_VALUE(is_pow2_block(had_in) && had_in <= kMaxHad && (had_in == 0 || K % had_in == 0),
                    "had_in must be 0 or a power of two <= ", kMaxHad, " dividing K = ", K, ", got ", had_in);
  c10::cuda::CUDAGuard guard(x.device());
  LayerArgs L{};
  L.su = su.data_ptr<float>();
  L.A = A.data_ptr<float>();
  L.b = b.data_ptr<float>();
  L.K = static_cast<int>(K);
  L.Kp = static_cast<int>((K + kKAlign - 1) / kKAlign * kKAlign);
  L.had_in = static_cast<int>(had_in);
  const int64_t Mt = (M + 7) / 8;
  at::Tensor act = at::empty({Mt, L.Kp / 16, 32, 4}, x.options().dtype(at::kInt));
  at::Tensor const_ws = at::empty({transform_slices(L.Kp), 8 * Mt}, x.options().dtype(at::kFloat));
  if (M > 0)
    check_launch(launch_transform(dtype_of(x), xk.data_ptr(), static_cast<int>(M), L,
                                  reinterpret_cast<uint32_t*>(act.data_ptr()), const_ws.data_ptr<float>(),
                                  c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
                 "transform kernel launch");
  return {act, const_ws};
}

}  // namespace
}  // namespace pyquant_cuda

TORCH_LIBRARY_FRAGMENT(pyquant, m) {
  m.def(
      "cuda_linear(Tensor x, Tensor codes, Tensor su, Tensor sv, Tensor A, Tensor b, Tensor w_scale, "
      "Tensor? bias, Tensor(a!) counters, int N, int had_in, int had_out, int small_max_m) -> Tensor");
  m.def("cuda_transform(Tensor x, Tensor su, Tensor A, Tensor b, int had_in) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyquant, CUDA, m) {
  m.impl("cuda_linear", &pyquant_cuda::cuda_linear);
  m.impl("cuda_transform", &pyquant_cuda::transform);
}

// The importable (empty) Python module; loading it runs the registrations above.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif
#define PYQ_CAT2(a, b) a##b
#define PYQ_CAT(a, b) PYQ_CAT2(a, b)
#define PYQ_STR2(a) #a
#define PYQ_STR(a) PYQ_STR2(a)

PyMODINIT_FUNC PYQ_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, PYQ_STR(TORCH_EXTENSION_NAME),
                                      "pyquant CUDA kernels; the ops are torch.ops.pyquant.cuda_*", -1, nullptr};
  return PyModule_Create(&module);
}
