// The CPU quantized linear layer: y = sv * H_out(w_scale * (z . xt + const)) + bias.
//
// Three threaded passes (at::parallel_for, i.e. torch's thread pool):
//  1. per token, the fused activation transform: su * x, blockwise FWHT of H_in, per-4-chunk A^T,
//     the per-token constant sum_j b . x'_j, and (int mode) rounding to 16-bit fixed point split
//     into two int8 halves, written in the layout the chosen kernel reads (see kernel_api.h);
//  2. per range of output rows, the unsigned INT2 dot products of the kernel set chosen at run time
//     (kernel_table.h: AVX-512 VNNI, AVX2, NEON or portable): GEMV up to 32 tokens (8 for a layer
//     whose codes fit in cache), a cache-blocked GEMM above where the set has one;
//  3. per token, the output transform: scale, H_out, sv, bias, cast to the input dtype.
// Passes 1 and 3 (transform.h) have a portable and an AVX-512 build that round identically, and the
// int kernels return exact integers, so int mode gives bit-identical results on every ISA and
// thread count; float mode is deterministic per ISA.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_api.h"
#include "kernel_table.h"
#include "transform.h"

namespace pyquant {
namespace {

using cpu::kGroupCodes;
using cpu::kGroupElems;

using cpu::KernelSet;
enum class Mode { kInt = 0, kFloat = 1 };

std::atomic<const KernelSet*> g_isa{nullptr};  // null: automatic (the best this CPU supports)
std::atomic<int> g_mode{static_cast<int>(Mode::kInt)};

std::string known_isas() {
  int n;
  const KernelSet* sets = cpu::kernel_sets(&n);
  std::string out = "'auto'";
  for (int i = 0; i < n; ++i) out += std::string(", '") + sets[i].name + "'";
  return out;
}

const KernelSet& parse_isa(const std::string& name, const char* arg) {
  if (name.empty()) return g_isa.load() ? *g_isa.load() : cpu::best_kernel_set();
  if (name == "auto") return cpu::best_kernel_set();
  const KernelSet* set = cpu::find_kernel_set(name.c_str());
  TORCH_CHECK_VALUE(set, arg, " must be one of ", known_isas(), " in this build, got '", name, "'");
  TORCH_CHECK_VALUE(set->supported(), arg, " '", name, "' is not supported by this CPU (best available: '",
                    cpu::best_kernel_set().name, "')");
  return *set;
}

Mode parse_mode(const std::string& name) {
  if (name.empty()) return static_cast<Mode>(g_mode.load());
  if (name == "int") return Mode::kInt;
  if (name == "float") return Mode::kFloat;
  TORCH_CHECK_VALUE(false, "mode must be 'int' or 'float', got '", name, "'");
  return Mode::kInt;
}

void check_block(int64_t block, int64_t dim, const char* name, const char* dim_name) {
  TORCH_CHECK_VALUE(block >= 0 && (block == 0 || ((block & (block - 1)) == 0 && dim % block == 0)), name,
                    " must be 0 or a power of two dividing ", dim_name, "=", dim, ", got ", block);
}

// A 1-D float vector of `n` elements (fp32, fp16 or bf16, any stride) as fp32: a pointer into `t`
// when it already is contiguous fp32, else into `buf`, converted here. su and sv are fp16 in the
// format; converting them in a plain loop costs far less than an ATen .to() call per layer call.
const float* vector_f32(const torch::Tensor& t, int64_t n, const char* name, std::vector<float>& buf) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  if (t.scalar_type() == torch::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  buf.resize(n);
  const auto widen = [&](const auto* p, int64_t stride) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i * stride]);
  };
  switch (t.scalar_type()) {
    case torch::kHalf: widen(t.data_ptr<c10::Half>(), t.stride(0)); break;
    case torch::kBFloat16: widen(t.data_ptr<c10::BFloat16>(), t.stride(0)); break;
    case torch::kFloat: widen(t.data_ptr<float>(), t.stride(0)); break;
    default: {  // fp64
      const auto f = t.to(torch::kFloat).contiguous();
      widen(f.data_ptr<float>(), 1);
    }
  }
  return buf.data();
}

// The per-token math (transform.h) of the chosen kernel set; every build gives the same bits.
struct TokenMath {
  const cpu::TransformOps& ops;
  template <typename T>
  void scale_input(const T* x, const float* su, int64_t K, float* xt) const {
    if constexpr (std::is_same_v<T, float>) {
      ops.scale_f32(x, su, K, xt);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      ops.scale_bf16(reinterpret_cast<const uint16_t*>(x), su, K, xt);
    } else {
      for (int64_t k = 0; k < K; ++k) xt[k] = static_cast<float>(x[k]) * su[k];
    }
  }
  double transform(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax) const {
    return ops.transform(xt, K, had, A, b, amax);
  }
  double encode_int(float* xt, float amax, int64_t G, bool plane, int8_t* dst) const {
    return ops.encode_int(xt, amax, G, plane, dst);
  }
  void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row) const { ops.dequant_i32(d, N, a, c, row); }
  void dequant_row(const float* d, int64_t N, float a, float c, float* row) const { ops.dequant_f32(d, N, a, c, row); }
  void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias) const {
    ops.output_transform(row, N, had, sv, bias);
  }
};

struct Layer {
  torch::Tensor codes;
  const float* su;    // [K] fp32, into the caller's tensor or su_buf
  const float* sv;    // [N]
  const float* bias;  // [N] or nullptr
  std::vector<float> su_buf, sv_buf, bias_buf;  // moving a vector keeps its storage: moves are safe
  Layer() = default;
  Layer(Layer&&) = default;
  Layer(const Layer&) = delete;  // a copy would leave the pointers in the original's buffers
  float A[16], b[4], w_scale;
  bool A_finite;  // a NaN or Inf in A makes every codeword, so every output, NaN
  int64_t N, K, K4, G, had_in, had_out;
};

Layer check_layer(const torch::Tensor& codes, const torch::Tensor& A, const torch::Tensor& b, const torch::Tensor& su,
                  const torch::Tensor& sv, const torch::Tensor& w_scale, int64_t had_in, int64_t had_out,
                  const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK_TYPE(codes.scalar_type() == torch::kUInt8, "codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.device().is_cpu(), "codes must be on the CPU, got ", codes.device());
  TORCH_CHECK_VALUE(codes.dim() == 2, "codes must be 2-D [N, K/4], got shape ", codes.sizes());
  TORCH_CHECK_VALUE(codes.is_contiguous(), "codes must be contiguous");
  Layer L;
  L.codes = codes;
  L.N = codes.size(0);
  L.K4 = codes.size(1);
  L.K = 4 * L.K4;
  L.G = (L.K4 + kGroupCodes - 1) / kGroupCodes;
  TORCH_CHECK_VALUE(L.N > 0 && L.K4 > 0, "codes must be non-empty, got shape ", codes.sizes());
  for (const auto& [t, name, shape] : {std::make_tuple(&A, "A", std::vector<int64_t>{4, 4}),
                                       std::make_tuple(&b, "b", std::vector<int64_t>{4}),
                                       std::make_tuple(&w_scale, "w_scale", std::vector<int64_t>{})}) {
    TORCH_CHECK_TYPE(t->scalar_type() == torch::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), name, " must be on the CPU, got ", t->device());
    TORCH_CHECK_VALUE(t->sizes() == c10::IntArrayRef(shape), name, " must have shape ", c10::IntArrayRef(shape),
                      ", got ", t->sizes());
  }
  const auto Ac = A.contiguous();
  const auto bc = b.contiguous();
  L.A_finite = true;
  for (int i = 0; i < 16; ++i) {
    L.A[i] = Ac.data_ptr<float>()[i];
    L.A_finite = L.A_finite && std::isfinite(L.A[i]);
  }
  for (int i = 0; i < 4; ++i) L.b[i] = bc.data_ptr<float>()[i];
  L.w_scale = *w_scale.data_ptr<float>();  // (checked: a CPU float32 scalar; .item() costs a dispatch)
  L.su = vector_f32(su, L.K, "su", L.su_buf);
  L.sv = vector_f32(sv, L.N, "sv", L.sv_buf);
  L.bias = bias.has_value() && bias->defined() ? vector_f32(*bias, L.N, "bias", L.bias_buf) : nullptr;
  check_block(had_in, L.K, "had_in", "K");
  check_block(had_out, L.N, "had_out", "N");
  L.had_in = had_in;
  L.had_out = had_out;
  return L;
}

void check_input(const torch::Tensor& x, const Layer& L) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == torch::kFloat || dt == torch::kBFloat16 || dt == torch::kHalf,
                   "x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == L.K, "x must have shape [M, ", L.K, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "x must be contiguous (got strides ", x.strides(),
                    "); call .contiguous() first");
}

// Bytes per token of the int-mode activations (both layouts): 512 per group of 256 elements.
inline int64_t act_stride(const Layer& L) { return L.G * 512; }

// Passes 1 and 3 give each thread at least this many elements (torch's own grain size).
constexpr int64_t kTokenGrain = 32768;

// Pass 1 for token m: writes the kernel's activation layout, returns (scale, const).
template <typename T>
void prepare_tokens(const T* x, const Layer& L, const TokenMath& math, Mode mode, bool plane, int64_t M, void* act,
                    double* scale, double* cst) {
  const float* su = L.su;
  at::parallel_for(0, M, std::max<int64_t>(1, kTokenGrain / L.K), [&](int64_t m0, int64_t m1) {
    std::vector<float> xt(L.G * kGroupElems, 0.f);  // zero tail: the padding of the last group
    for (int64_t m = m0; m < m1; ++m) {
      float amax;
      math.scale_input(x + m * L.K, su, L.K, xt.data());
      cst[m] = math.transform(xt.data(), L.K, L.had_in, L.A, L.b, &amax);
      if (!L.A_finite) amax = std::numeric_limits<float>::quiet_NaN();  // max() may have dropped the NaN
      if (mode == Mode::kInt) {
        scale[m] = math.encode_int(xt.data(), amax, L.G, plane, static_cast<int8_t*>(act) + m * act_stride(L));
      } else {
        scale[m] = 1.0;
        cpu::encode_float(xt.data(), L.G, static_cast<float*>(act) + m * L.G * kGroupElems);
      }
    }
  });
}

// Pass 3: y[m] = sv * H_out(w_scale * (scale[m] * dot[m] + cst[m])) + bias, in T.
// int32 and fp32 dot products are scaled in fp32 (vectorized; V < 2^31 rounds to float with a
// relative error of 6e-8), int64 ones in double, and so are tokens whose scale is near the bottom
// of the float range (|x| ~ 1e-37 and below). fp32 outputs are transformed in place in y.
template <typename T, typename D>
void finish_tokens(const D* dot, const Layer& L, const TokenMath& math, int64_t M, const double* scale,
                   const double* cst, T* y) {
  const float* sv = L.sv;
  const float* bias = L.bias;
  constexpr bool kFloatOut = std::is_same_v<T, float>;
  at::parallel_for(0, M, std::max<int64_t>(1, kTokenGrain / L.N), [&](int64_t m0, int64_t m1) {
    std::vector<float> tmp(kFloatOut ? 0 : L.N);
    for (int64_t m = m0; m < m1; ++m) {
      float* row = kFloatOut ? reinterpret_cast<float*>(y + m * L.N) : tmp.data();
      const D* d = dot + m * L.N;
      const double a = static_cast<double>(L.w_scale) * scale[m], c = static_cast<double>(L.w_scale) * cst[m];
      // In double for int64 dot products, and for a token so small that a is near or below the
      // float range (a subnormal a would keep only a few bits).
      bool in_double = a != 0.0 && std::abs(a) < 0x1p-100;
      if constexpr (std::is_same_v<D, int64_t>) in_double = true;
      if (in_double) {
        for (int64_t n = 0; n < L.N; ++n) row[n] = static_cast<float>(a * static_cast<double>(d[n]) + c);
      } else if constexpr (!std::is_same_v<D, int64_t>) {
        math.dequant_row(d, L.N, static_cast<float>(a), static_cast<float>(c), row);
      }
      math.output_transform(row, L.N, L.had_out, sv, bias);
      if constexpr (!kFloatOut) {
        T* out = y + m * L.N;
        for (int64_t n = 0; n < L.N; ++n) out[n] = static_cast<T>(row[n]);
      }
    }
  });
}

// Pass 2 over row tiles: fn(n0, n1, worker) computes rows [n0, n1) on worker `worker`
// (0 <= worker < workers(), for per-thread scratch). Threads take tiles from a shared counter
// rather than fixed halves, so a thread that starts late (descheduled, or busy elsewhere) does
// less instead of holding up the rest. Every row is still computed by one thread, in one fixed
// order: the split does not change the result.
struct RowSplit {
  static constexpr int64_t kMinGrabRows = 256;  // rows per kernel call where the layer has them (see run)
  int64_t N, tiles, threads;
  RowSplit(int64_t N, int64_t work, int64_t serial_work)
      : N(N), tiles((N + cpu::kRowTile - 1) / cpu::kRowTile), threads(at::get_num_threads()) {
    if (tiles <= 1 || work < serial_work) threads = 1;
  }
  int64_t workers() const { return threads; }
  template <typename Fn>
  void run(Fn fn) const {
    if (threads <= 1) {
      fn(int64_t(0), N, int64_t(0));
      return;
    }
    // Each grab is one kernel call, and a call has a fixed cost (the tile kernel transposes every
    // token, the GEMM packs its tile): at least 256 rows per call where the layer has them, and at
    // most two calls per thread on a small layer (384 rows: 12 calls of 32 made 2 threads slower
    // than 1 at 29 tokens).
    const int64_t grab = std::max({int64_t(1), tiles / (8 * threads),
                                   std::min<int64_t>(kMinGrabRows / cpu::kRowTile, (tiles + 2 * threads - 1) / (2 * threads))});
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t worker = w0; worker < w1; ++worker)
        for (int64_t t0; (t0 = next.fetch_add(grab)) < tiles;)
          fn(t0 * cpu::kRowTile, std::min(N, (t0 + grab) * cpu::kRowTile), worker);
    });
  }
};

// Scratch of one call (encoded activations, dot products, GEMM tiles), kept per calling thread
// and reused: at large batches a fresh allocation would fault in tens of MB of new pages on every
// call. Requests above kWorkspaceCacheBytes get a temporary allocation instead of being kept.
constexpr size_t kWorkspaceCacheBytes = size_t(64) << 20;

class Workspace {
 public:
  ~Workspace() { std::free(kept_); }
  // `bytes` of 64-byte aligned scratch, valid until the next call on this thread.
  uint8_t* get(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > kWorkspaceCacheBytes) {
      temp_ = torch::empty({static_cast<int64_t>(bytes) + 64}, torch::kUInt8);
      const auto p = reinterpret_cast<uintptr_t>(temp_.data_ptr<uint8_t>());
      return reinterpret_cast<uint8_t*>((p + 63) / 64 * 64);
    }
    temp_ = torch::Tensor();
    if (bytes > size_) {
      std::free(kept_);
      kept_ = static_cast<uint8_t*>(std::aligned_alloc(64, bytes));
      size_ = kept_ ? bytes : 0;
      TORCH_CHECK(kept_, "pyquant: could not allocate ", bytes, " bytes of scratch");
    }
    return kept_;
  }

 private:
  uint8_t* kept_ = nullptr;
  size_t size_ = 0;
  torch::Tensor temp_;
};

thread_local Workspace t_workspace;

inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

template <typename T>
void qlinear_impl(const torch::Tensor& x, const Layer& L, const KernelSet& set, Mode mode, bool gemm,
                  torch::Tensor& y) {
  const int64_t M = x.size(0);
  // (a set's own threshold is about its int kernels; float mode runs the GEMV of every set)
  const int64_t serial = mode == Mode::kInt && set.serial_work ? set.serial_work(M) : cpu::kSerialWork;
  const RowSplit split(L.N, L.N * L.K * M, serial);
  const T* xp = x.data_ptr<T>();
  const TokenMath math{*set.math};
  std::vector<double> scale(M);
  std::vector<double> cst(M);
  if (mode == Mode::kInt) {
    const bool narrow = L.K <= cpu::kInt32MaxK;
    const int64_t act_bytes = align64(M * act_stride(L)), dot_bytes = align64(M * L.N * (narrow ? 4 : 8));
    const int64_t slot = gemm ? align64(cpu::gemm_scratch_bytes(L.K4)) : 0;  // per-thread GEMM tile
    uint8_t* ws = t_workspace.get(act_bytes + dot_bytes + split.workers() * slot);
    auto* act = reinterpret_cast<int8_t*>(ws);
    void* dot = ws + act_bytes;
    uint8_t* scratch = ws + act_bytes + dot_bytes;
    prepare_tokens(xp, L, math, mode, /*plane=*/!gemm, M, act, scale.data(), cst.data());
    cpu::IntArgs args{L.codes.data_ptr<uint8_t>(), L.N, L.K4, L.G, act, act_stride(L), M,
                      narrow ? static_cast<int32_t*>(dot) : nullptr, narrow ? nullptr : static_cast<int64_t*>(dot),
                      nullptr};
    const cpu::IntKernel kernel = gemm ? set.int_gemm : set.int_gemv;
    split.run([&](int64_t n0, int64_t n1, int64_t worker) {
      cpu::IntArgs mine = args;
      mine.scratch = reinterpret_cast<uint32_t*>(scratch + worker * slot);
      kernel(mine, n0, n1);
    });
    if (narrow) finish_tokens(static_cast<const int32_t*>(dot), L, math, M, scale.data(), cst.data(), y.data_ptr<T>());
    else finish_tokens(static_cast<const int64_t*>(dot), L, math, M, scale.data(), cst.data(), y.data_ptr<T>());
  } else {
    const int64_t act_bytes = align64(M * L.G * kGroupElems * 4);
    uint8_t* ws = t_workspace.get(act_bytes + M * L.N * 4);
    auto* act = reinterpret_cast<float*>(ws);
    auto* dot = reinterpret_cast<float*>(ws + act_bytes);
    prepare_tokens(xp, L, math, mode, /*plane=*/true, M, act, scale.data(), cst.data());
    const cpu::FloatArgs args{L.codes.data_ptr<uint8_t>(), L.N, L.K4, L.G, act, M, dot};
    split.run([&](int64_t n0, int64_t n1, int64_t) { set.float_gemv(args, n0, n1); });
    finish_tokens(dot, L, math, M, scale.data(), cst.data(), y.data_ptr<T>());
  }
}

}  // namespace

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                      const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                      const torch::Tensor& w_scale, int64_t had_in, int64_t had_out,
                      const c10::optional<torch::Tensor>& bias, const std::string& isa_name_arg,
                      const std::string& mode_name, const std::string& algo) {
  const Layer L = check_layer(codes, A, b, su, sv, w_scale, had_in, had_out, bias);
  check_input(x, L);
  const KernelSet& set = parse_isa(isa_name_arg, "isa");
  const Mode mode = parse_mode(mode_name);
  TORCH_CHECK_VALUE(algo == "auto" || algo == "gemv" || algo == "gemm", "algo must be 'auto', 'gemv' or 'gemm', got '",
                    algo, "'");
  const bool gemm_possible = mode == Mode::kInt && set.int_gemm != nullptr;
  TORCH_CHECK_VALUE(algo != "gemm" || gemm_possible, "algo 'gemm' needs mode 'int' and an isa with a GEMM ('",
                    set.name, "' has ", set.int_gemm ? "one" : "none", ")");
  const int64_t gemv_max =
      L.N * L.K4 <= cpu::kSmallLayerCodeBytes ? cpu::kGemvMaxTokensSmallLayer : cpu::kGemvMaxTokens;
  const bool gemm = gemm_possible && (algo == "gemm" || (algo == "auto" && x.size(0) > gemv_max));
  auto y = torch::empty({x.size(0), L.N}, x.options());
  if (x.size(0) == 0) return y;
  switch (x.scalar_type()) {
    case torch::kFloat: qlinear_impl<float>(x, L, set, mode, gemm, y); break;
    case torch::kBFloat16: qlinear_impl<c10::BFloat16>(x, L, set, mode, gemm, y); break;
    default: qlinear_impl<c10::Half>(x, L, set, mode, gemm, y); break;
  }
  return y;
}

std::tuple<torch::Tensor, torch::Tensor> transform_activations(const torch::Tensor& x, const torch::Tensor& su,
                                                               const torch::Tensor& A, const torch::Tensor& b,
                                                               int64_t had_in) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) % 4 == 0 && x.size(1) > 0, "x must be 2-D [M, K] with K % 4 == 0, got ",
                    x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  // Reuse the layer checks with a dummy one-row weight.
  const auto codes = torch::zeros({1, K / 4}, torch::kUInt8);
  const auto ones = torch::ones({1});
  const Layer L = check_layer(codes, A, b, su, ones, torch::ones({}), had_in, 0, c10::nullopt);
  check_input(x, L);
  auto xt = torch::empty({M, K}, torch::kFloat);
  auto cst = torch::empty({M}, torch::kDouble);
  const auto xf = x.to(torch::kFloat);
  for (int64_t m = 0; m < M; ++m) {
    float amax;
    float* row = xt.data_ptr<float>() + m * K;
    cpu::scale_input(xf.data_ptr<float>() + m * K, L.su, K, row);
    cst.data_ptr<double>()[m] = cpu::transform_activations(row, K, had_in, L.A, L.b, &amax);
  }
  return {xt, cst.to(torch::kFloat)};
}

void set_isa(const std::string& name) {
  g_isa.store(name.empty() || name == "auto" ? nullptr : &parse_isa(name, "isa"));
}
std::string get_isa() { return parse_isa("", "isa").name; }
std::vector<std::string> supported_isas() {
  int n;
  const KernelSet* sets = cpu::kernel_sets(&n);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i)
    if (sets[i].supported()) out.emplace_back(sets[i].name);
  return out;
}
void set_mode(const std::string& name) { g_mode.store(static_cast<int>(parse_mode(name.empty() ? "int" : name))); }
std::string get_mode() { return static_cast<Mode>(g_mode.load()) == Mode::kInt ? "int" : "float"; }

}  // namespace pyquant
