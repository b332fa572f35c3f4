// The CPU quantized linear layer: y = sv * H_out(w_scale * (z . xt + const)) + bias.
//
// Three passes, threaded in one parallel region of torch's thread pool per call (CallSplit):
//  1. per token, the fused activation transform: su * x, blockwise FWHT of H_in, per-4-chunk A^T,
//     the per-token constant sum_j b . x'_j, and (int mode) rounding to 16-bit fixed point split
//     into two int8 halves, written in the layout the chosen kernel reads (see kernel_api.h), and
//     for the tile kernel its operands, made once per call;
//  2. per range of output rows and tokens, the unsigned INT2 dot products of the kernel set chosen at run time
//     (kernel_table.h: AVX-512 VNNI, AVX2, NEON or portable): GEMV up to 4-32 tokens (fewer for
//     shorter rows: kernel_api.h gemv_max_tokens), a cache-blocked GEMM above where the set has one;
//  3. per token, the output transform: scale, H_out, sv, bias, cast to the input dtype.
// Passes 1 and 3 (transform.h) have a portable and an AVX-512 build that round identically, and the
// int kernels return exact integers, so int mode gives bit-identical results on every ISA and
// thread count; float mode is deterministic per ISA. Mode "lut" (lut_linear, on codes repacked by
// pack_lut_codes) is int mode with the activations cut to 14 bits and table-lookup kernels in pass
// 2, whose tables pass 1 makes (kernel_api.h); exact integers too. Mode "lut3" (lut3_linear, on
// codes repacked by pack_lut3_codes) likewise, with ~12-bit activations and one lookup per three
// weights.
#include "ops.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
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
// kLut: int mode's activations cut to 14 bits and multiplied by table lookups (kernel_api.h), on
// codes in the LUT layout: lut_linear's only mode. As the default for the other ops it is int mode.
// kLut3 likewise: ~12-bit activations, triple lookups, codes in the LUT3 layout (lut3_linear).
enum class Mode { kInt = 0, kFloat = 1, kLut = 2, kLut3 = 3 };

std::atomic<const KernelSet*> g_isa{nullptr};  // null: automatic (the best this CPU supports)
// set_mode's setting: a Mode, or kAutoMode, the initial one: the kernel set's own default
// (KernelSet::lut_by_default), resolved at each use so that it follows set_isa.
constexpr int kAutoMode = -1;
std::atomic<int> g_mode{kAutoMode};

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

// The mode of a call on codes in the natural layout: "lut" and "lut3" (set_mode's default only) run
// int mode there, for lut_linear and lut3_linear alone have the codes their kernels read.
Mode parse_mode(const std::string& name) {
  if (name.empty()) return g_mode.load() == static_cast<int>(Mode::kFloat) ? Mode::kFloat : Mode::kInt;
  if (name == "int") return Mode::kInt;
  if (name == "float") return Mode::kFloat;
  TORCH_CHECK_VALUE(name != "lut", "mode 'lut' needs codes in the LUT layout (_C.pack_lut_codes): ",
                    "call pyquant::lut_linear");
  TORCH_CHECK_VALUE(name != "lut3", "mode 'lut3' needs codes in the LUT3 layout (_C.pack_lut3_codes): ",
                    "call pyquant::lut3_linear");
  TORCH_CHECK_VALUE(false, "mode must be 'int' or 'float', got '", name, "'");
  return Mode::kInt;
}

void check_block(int64_t block, int64_t dim, const char* name, const char* dim_name) {
  TORCH_CHECK_VALUE(block >= 0 && (block == 0 || ((block & (block - 1)) == 0 && dim % block == 0)), name,
                    " must be 0 or a power of two dividing ", dim_name, "=", dim, ", got ", block);
}

// A 1-D float vector of `n` elements (fp32, fp16 or bf16, any stride) as fp32: a pointer into `t`
// when it already is contiguous fp32, else into `buf`, converted here (contiguous fp16, what the
// format stores su and sv in, by the kernel set's vector conversion). An ATen .to() call per
// layer call would cost more than the conversion.
const float* vector_f32(const torch::Tensor& t, int64_t n, const char* name, std::vector<float>& buf,
                        const cpu::TransformOps& math) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  if (t.scalar_type() == torch::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  buf.resize(n);
  if (t.scalar_type() == torch::kHalf && t.is_contiguous()) {
    math.widen_half(reinterpret_cast<const uint16_t*>(t.data_ptr<c10::Half>()), n, buf.data());
    return buf.data();
  }
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
    } else {  // fp16
      ops.widen_half(reinterpret_cast<const uint16_t*>(x), K, xt);
      ops.scale_f32(xt, su, K, xt);
    }
  }
  double transform(float* xt, int64_t K, int64_t had, const float* A, const float* b, float* amax) const {
    return ops.transform(xt, K, had, A, b, amax);
  }
  double encode_int(float* xt, int64_t K, float amax, int64_t G, bool plane, int8_t* dst) const {
    return ops.encode_int(xt, K, amax, G, plane, dst);
  }
  void dequant_row(const int32_t* d, int64_t N, float a, float c, float* row) const { ops.dequant_i32(d, N, a, c, row); }
  void dequant_row(const float* d, int64_t N, float a, float c, float* row) const { ops.dequant_f32(d, N, a, c, row); }
  void output_transform(float* row, int64_t N, int64_t had, const float* sv, const float* bias) const {
    ops.output_transform(row, N, had, sv, bias);
  }
  // out[0, n) = row rounded to T (bf16 or fp16)
  template <typename T>
  void narrow(const float* row, int64_t n, T* out) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) ops.narrow_bf16(row, n, reinterpret_cast<uint16_t*>(out));
    else ops.narrow_half(row, n, reinterpret_cast<uint16_t*>(out));
  }
};

struct Layer {
  torch::Tensor codes;
  torch::Tensor lut3_codes;  // mode lut3: the codes in the LUT3 layout (lut3_linear), else undefined
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

// The codes' part of a layer: shape and the dimensions derived from it.
Layer check_codes(const torch::Tensor& codes) {
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
  return L;
}

void set_codebook(Layer& L, const float* A, const float* b, float w_scale) {
  L.A_finite = true;
  for (int i = 0; i < 16; ++i) {
    L.A[i] = A[i];
    L.A_finite = L.A_finite && std::isfinite(L.A[i]);
  }
  for (int i = 0; i < 4; ++i) L.b[i] = b[i];
  L.w_scale = w_scale;
}

void set_blocks(Layer& L, int64_t had_in, int64_t had_out) {
  check_block(had_in, L.K, "had_in", "K");
  check_block(had_out, L.N, "had_out", "N");
  L.had_in = had_in;
  L.had_out = had_out;
}

Layer check_layer(const torch::Tensor& codes, const torch::Tensor& A, const torch::Tensor& b, const torch::Tensor& su,
                  const torch::Tensor& sv, const torch::Tensor& w_scale, int64_t had_in, int64_t had_out,
                  const c10::optional<torch::Tensor>& bias, const cpu::TransformOps& math) {
  Layer L = check_codes(codes);
  for (const auto& [t, name, shape] : {std::make_tuple(&A, "A", std::vector<int64_t>{4, 4}),
                                       std::make_tuple(&b, "b", std::vector<int64_t>{4}),
                                       std::make_tuple(&w_scale, "w_scale", std::vector<int64_t>{})}) {
    TORCH_CHECK_TYPE(t->scalar_type() == torch::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu(), name, " must be on the CPU, got ", t->device());
    TORCH_CHECK_VALUE(t->sizes() == c10::IntArrayRef(shape), name, " must have shape ", c10::IntArrayRef(shape),
                      ", got ", t->sizes());
  }
  // (checked: CPU float32 tensors; .item() would cost a dispatch)
  set_codebook(L, A.contiguous().data_ptr<float>(), b.contiguous().data_ptr<float>(), *w_scale.data_ptr<float>());
  L.su = vector_f32(su, L.K, "su", L.su_buf, math);
  L.sv = vector_f32(sv, L.N, "sv", L.sv_buf, math);
  L.bias = bias.has_value() && bias->defined() ? vector_f32(*bias, L.N, "bias", L.bias_buf, math) : nullptr;
  set_blocks(L, had_in, had_out);
  return L;
}

// The layer from frozen_linear's params (see kParamsHead): pointers into it, nothing converted.
void set_params(Layer& L, const torch::Tensor& params, int64_t had_in, int64_t had_out) {
  TORCH_CHECK_TYPE(params.scalar_type() == torch::kFloat, "params must be float32, got ", params.scalar_type());
  TORCH_CHECK_VALUE(params.device().is_cpu(), "params must be on the CPU, got ", params.device());
  const int64_t plain = kParamsHead + L.K + L.N;  // without a bias
  TORCH_CHECK_VALUE(params.dim() == 1 && (params.size(0) == plain || params.size(0) == plain + L.N) &&
                        params.is_contiguous(),
                    "params must be contiguous of shape [", plain, "] or [", plain + L.N, "] (", kParamsHead,
                    " + K + N, + N with a bias), got ", params.sizes());
  const float* p = params.data_ptr<float>();
  set_codebook(L, p, p + 16, p[20]);
  L.su = p + kParamsHead;
  L.sv = p + kParamsHead + L.K;
  L.bias = params.size(0) > plain ? p + plain : nullptr;
  set_blocks(L, had_in, had_out);
}

Layer layer_from_params(const torch::Tensor& codes, const torch::Tensor& params, int64_t had_in, int64_t had_out) {
  Layer L = check_codes(codes);
  set_params(L, params, had_in, had_out);
  return L;
}

// lut3_linear's layer: `codes` in the natural layout (for the GEMM, and the shapes), lut3_codes in
// the LUT3 layout (for the GEMV).
Layer layer_from_lut3(const torch::Tensor& codes, const torch::Tensor& lut3_codes, const torch::Tensor& params,
                      int64_t had_in, int64_t had_out) {
  Layer L = check_codes(codes);
  TORCH_CHECK_TYPE(lut3_codes.scalar_type() == torch::kUInt8, "lut3_codes must be uint8, got ",
                   lut3_codes.scalar_type());
  TORCH_CHECK_VALUE(lut3_codes.device().is_cpu(), "lut3_codes must be on the CPU, got ", lut3_codes.device());
  const int64_t groups = cpu::lut3_groups(L.N), bytes = cpu::lut3_chunks(L.K4) * cpu::kLut3ChunkBytes;
  TORCH_CHECK_VALUE(lut3_codes.dim() == 2 && lut3_codes.size(0) == groups && lut3_codes.size(1) == bytes &&
                        lut3_codes.is_contiguous(),
                    "lut3_codes must be contiguous [", groups, ", ", bytes, "] (_C.pack_lut3_codes of codes [", L.N,
                    ", ", L.K4, "]), got ", lut3_codes.sizes());
  L.lut3_codes = lut3_codes;
  set_params(L, params, had_in, had_out);
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

// Pass 1 for tokens [m0, m1): writes the kernel's activation layout, (scale, const) per token.
// `xt` is G * 256 floats whose tail past K is zero (the padding of the last group).
template <typename T>
void prepare_tokens(const T* x, const Layer& L, const TokenMath& math, Mode mode, bool plane, int64_t m0, int64_t m1,
                    void* act, double* scale, double* cst, float* xt) {
  for (int64_t m = m0; m < m1; ++m) {
    float amax;
    math.scale_input(x + m * L.K, L.su, L.K, xt);
    cst[m] = math.transform(xt, L.K, L.had_in, L.A, L.b, &amax);
    if (!L.A_finite) amax = std::numeric_limits<float>::quiet_NaN();  // max() may have dropped the NaN
    if (mode != Mode::kFloat) {
      scale[m] = math.encode_int(xt, L.K, amax, L.G, plane, static_cast<int8_t*>(act) + m * act_stride(L));
    } else {
      scale[m] = 1.0;
      cpu::encode_float(xt, L.G, static_cast<float*>(act) + m * L.G * kGroupElems);
    }
  }
}

// Pass 3 for tokens [m0, m1): y[m] = sv * H_out(w_scale * (scale[m] * dot[m] + cst[m])) + bias, in T.
// int32 and fp32 dot products are scaled in fp32 (vectorized; V < 2^31 rounds to float with a
// relative error of 6e-8), int64 ones in double, and so are tokens whose scale is near the bottom
// of the float range (|x| ~ 1e-37 and below). fp32 outputs are transformed in place in y, others
// in `tmp` (N floats).
template <typename T, typename D>
void finish_tokens(const D* dot, const Layer& L, const TokenMath& math, int64_t m0, int64_t m1, const double* scale,
                   const double* cst, T* y, float* tmp) {
  constexpr bool kFloatOut = std::is_same_v<T, float>;
  for (int64_t m = m0; m < m1; ++m) {
    float* row = kFloatOut ? reinterpret_cast<float*>(y + m * L.N) : tmp;
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
    math.output_transform(row, L.N, L.had_out, L.sv, L.bias);
    if constexpr (!kFloatOut) math.narrow(row, L.N, y + m * L.N);
  }
}

// Work that threads take in chunks: [0, total) cut into one contiguous region per worker. A
// worker takes chunks from the front of its own region, so the rows it multiplies are one stream
// of codes in address order (the kernels' software prefetch runs on into its next chunk; chunks
// dealt from one shared counter alternate between threads, and every chunk then starts cold:
// 4096 x 4096 from memory, 2 threads, same run: 0.216 -> 0.196 ms). A worker whose region is
// done takes chunks from the back of the others', so one that starts late (descheduled, or busy
// elsewhere) takes less instead of holding up the rest. Which thread computes a chunk never
// changes its result.
class WorkQueue {
 public:
  // Owners take `chunk`, others `steal` (smaller: the end of a pass is then shared more evenly);
  // region bounds and every chunk start on multiples of `steal` (pass 1 needs its token blocks whole).
  WorkQueue(int64_t total, int64_t chunk, int64_t workers, int64_t steal)
      : total_(total), steal_(std::max<int64_t>(1, steal)), chunk_(std::max(steal_, chunk / steal_ * steal_)),
        regions_(static_cast<size_t>(workers)) {
    const int64_t units = (total + steal_ - 1) / steal_;
    for (int64_t w = 0; w < workers; ++w) {
      const int64_t front = steal_ * (units * w / workers), back = steal_ * (units * (w + 1) / workers);
      regions_[w].span.store(pack(front, std::min(total, back)), std::memory_order_relaxed);
    }
  }
  // Runs fn(i0, i1) on chunks until none is left: worker's own region first, then the others'.
  template <typename Fn>
  void drain(int64_t worker, Fn fn) {
    const auto n = static_cast<int64_t>(regions_.size());
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = (worker + k) % n;
      for (int64_t i0, i1; take(regions_[r].span, /*front=*/k == 0, i0, i1);) {
        fn(i0, i1);
        done_.fetch_add(i1 - i0, std::memory_order_release);
      }
    }
  }
  // Until every chunk is finished. Called after drain() found nothing left, so it waits only for
  // chunks that other threads are computing: no deadlock whatever number of threads the pool runs.
  void wait() const {
    for (int spins = 0; done_.load(std::memory_order_acquire) < total_; ++spins) {
      if (spins < 4096) cpu_relax();
      else std::this_thread::yield();  // the other thread was descheduled: give it the core
    }
  }

 private:
  // A region's unclaimed [front, back), both in one word so a claim from either end is one CAS.
  struct alignas(64) Region {
    std::atomic<uint64_t> span{0};
  };
  static uint64_t pack(int64_t front, int64_t back) {
    return static_cast<uint64_t>(front) | static_cast<uint64_t>(back) << 32;
  }
  bool take(std::atomic<uint64_t>& span, bool front, int64_t& i0, int64_t& i1) const {
    uint64_t s = span.load(std::memory_order_relaxed);
    for (;;) {
      const auto f = static_cast<int64_t>(s & 0xFFFFFFFFu), b = static_cast<int64_t>(s >> 32);
      if (f >= b) return false;
      i0 = front ? f : std::max(f, (b - 1) / steal_ * steal_);
      i1 = front ? std::min(b, f + chunk_) : b;
      if (span.compare_exchange_weak(s, front ? pack(i1, b) : pack(f, i0), std::memory_order_relaxed)) return true;
    }
  }
  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  const int64_t total_, steal_, chunk_;
  std::vector<Region> regions_;
  std::atomic<int64_t> done_{0};
};

// How one call splits over threads, in one parallel region (one fork and join per call: a small
// layer's call takes tens of microseconds, and each fork costs a few). Two ways:
//  - by tokens, for a layer whose codes fit in cache: each thread runs all three passes on its
//    own contiguous range of tokens, over all rows. Nothing a thread writes is read by the other
//    (a line written on one core and read on the other costs a transfer between their caches, and
//    at a few dozen tokens those transfers cost as much as the work), and a model's next layer
//    finds its thread's tokens where this one left them;
//  - by rows, for a layer whose codes come from memory, or too few tokens: pass 1 and pass 3 take
//    chunks of tokens, pass 2 grabs of rows, each pass from a WorkQueue (each thread its own
//    contiguous region first), and each finished before the next starts.
// Every token and every row is computed by one thread in one fixed order: the split does not
// change the result.
struct CallSplit {
  static constexpr int64_t kMinGrabRows = 256;  // rows per kernel call where the layer has them
  int64_t M, N, tiles, threads, prepare_chunk, token_chunk, row_grab, row_steal;
  bool by_tokens;
  // `work`: the call's multiply-adds. `token_block`: pass 1 and a split by tokens take tokens in
  // multiples of it. `cached`: the layer's codes fit in cache. One thread below kSerialWork
  // multiply-adds, or below `serial_rows` where the split would be by rows (a kernel set may ask
  // for more: the tile kernel's rows cost little next to its fixed costs per call). `row_align`:
  // every range of rows a kernel call gets starts on a multiple of this many tiles (lut3's
  // bands or groups, kernel_api.h lut3_call_rows); `min_grab`: and it has at least this many tiles
  // where the layer has them (the lut3 GEMV reads all its tokens' tables once per call).
  CallSplit(int64_t M, int64_t N, int64_t work, int64_t serial_rows, int64_t token_block, bool cached,
            int64_t row_align = 1, int64_t min_grab = 1)
      : M(M), N(N), tiles((N + cpu::kRowTile - 1) / cpu::kRowTile), threads(at::get_num_threads()) {
    token_chunk = (M + threads - 1) / threads;
    token_chunk = (token_chunk + token_block - 1) / token_block * token_block;
    by_tokens = cached && token_chunk < M;
    if (work < (by_tokens ? cpu::kSerialWork : serial_rows) || at::in_parallel_region()) threads = 1;
    by_tokens = by_tokens && threads > 1;
    if (by_tokens) {
      threads = (M + token_chunk - 1) / token_chunk;
      prepare_chunk = token_chunk;
    } else {
      token_chunk = (M + 4 * threads - 1) / (4 * threads);
      prepare_chunk = (token_chunk + token_block - 1) / token_block * token_block;
    }
    // Each grab is one kernel call, and a call has a fixed cost (the tile kernel cuts its codes,
    // the GEMM packs its tile): at least 256 rows per call where the layer has them, and at most
    // two calls per thread on a small layer.
    row_grab = std::max({int64_t(1), tiles / (8 * threads),
                         std::min<int64_t>(kMinGrabRows / cpu::kRowTile, (tiles + 2 * threads - 1) / (2 * threads))});
    row_grab = std::max(row_grab, std::min(min_grab, (tiles + threads - 1) / threads));
    row_grab = (row_grab + row_align - 1) / row_align * row_align;
    row_steal = ((row_grab + 3) / 4 + row_align - 1) / row_align * row_align;
  }
  int64_t workers() const { return threads; }
  // prepare(m0, m1, worker) on tokens, multiply(n0, n1, m0, m1, worker) on rows x tokens, then
  // finish(m0, m1, worker) on tokens; 0 <= worker < workers() (for per-thread scratch).
  template <typename Prepare, typename Multiply, typename Finish>
  void run(Prepare prepare, Multiply multiply, Finish finish) const {
    if (threads <= 1) {
      prepare(int64_t(0), M, int64_t(0));
      multiply(int64_t(0), N, int64_t(0), M, int64_t(0));
      finish(int64_t(0), M, int64_t(0));
    } else if (by_tokens) {
      at::parallel_for(0, threads, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t m0 = w * token_chunk, m1 = std::min(M, m0 + token_chunk);
          prepare(m0, m1, w);
          multiply(int64_t(0), N, m0, m1, w);
          finish(m0, m1, w);
        }
      });
    } else {
      WorkQueue first(M, prepare_chunk, threads, prepare_chunk), rows(tiles, row_grab, threads, row_steal),
          last(M, token_chunk, threads, token_chunk);
      at::parallel_for(0, threads, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          first.drain(w, [&](int64_t m0, int64_t m1) { prepare(m0, m1, w); });
          first.wait();
          rows.drain(w, [&](int64_t t0, int64_t t1) {
            multiply(t0 * cpu::kRowTile, std::min(N, t1 * cpu::kRowTile), int64_t(0), M, w);
          });
          rows.wait();
          last.drain(w, [&](int64_t m0, int64_t m1) { finish(m0, m1, w); });
        }
      });
    }
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
  // the table-lookup GEMVs (mode lut: L.codes in the LUT layout; lut3: L.lut3_codes), or mode lut3
  // on the int GEMM (12-bit activations, the same V)
  const bool lut = mode == Mode::kLut || (mode == Mode::kLut3 && !gemm);
  const bool lut3_gemm = mode == Mode::kLut3 && gemm;
  const bool int_mode = mode != Mode::kFloat;
  // (a set's own threshold is about its int kernels; float mode runs the GEMV of every set)
  const int64_t serial = mode == Mode::kInt && set.serial_work ? set.serial_work(M) : cpu::kSerialWork;
  const bool narrow = L.K <= cpu::kInt32MaxK;
  // The kernel's operands made from the activations once per call: the tile kernel's (per block
  // of tokens).
  const int64_t packed_bytes = mode == Mode::kInt && !gemm && set.packed_bytes ? set.packed_bytes(M, L.G) : 0;
  const int64_t token_block = packed_bytes ? cpu::kPackTokenBlock : 1;
  // The lut modes' tables (per token, table_stride bytes) are made by every worker for itself, at
  // its first kernel call, from the activations: they are 4 (lut) to 21 (lut3) times their size,
  // and a thread reading another's from that core's cache took longer than making them (Zen 4,
  // 4096 x 512, one token, 2 threads, lut3: 0.035 -> 0.016 ms, int mode 0.018).
  const int64_t table_stride = mode == Mode::kLut3 ? cpu::lut3_table_stride(L.K4) : L.K4 * cpu::kLutTableBytes;
  const CallSplit split(M, L.N, L.N * L.K * M, serial, token_block,
                        int_mode && L.N * L.K4 <= cpu::kSmallLayerCodeBytes,
                        mode == Mode::kLut3 && !gemm ? cpu::lut3_call_rows(L.N, at::get_num_threads()) / cpu::kRowTile : 1,
                        // (11008 -> 4096 at 32 tokens, 2 threads: 256-row grabs 10.9 ms, int mode 7.9)
                        mode == Mode::kLut3 && !gemm && M > 1 ? cpu::kLut3SpanRows / cpu::kRowTile : 1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const TokenMath math{*set.math};
  // lut modes: the set's table-lookup kernels, else the portable ones (the same integers)
  int n_sets;
  const cpu::KernelSet& portable = cpu::kernel_sets(&n_sets)[0];
  const bool own_lut3 = set.runs_lut3();
  const cpu::IntKernel lut_gemv = mode == Mode::kLut3 ? (own_lut3 ? set : portable).lut3_gemv
                                                      : (set.lut_gemv ? set : portable).lut_gemv;
  const cpu::LutTables lut_tables = mode == Mode::kLut3 ? (own_lut3 ? set : portable).lut3_tables
                                                        : (set.lut_gemv ? set : portable).lut_tables;
  std::vector<double> scale(M), cst(M);
  std::vector<int64_t> lut3_cst(lut3_gemm ? M : 0);
  const cpu::Lut3Requantize lut3_requantize =
      set.lut3_requantize ? set.lut3_requantize : cpu::lut3_requantize_scalar;
  // Per worker: the token being transformed (G * 256 floats, zero tail), an output row in fp32
  // (N floats), and in int mode with the GEMM its tile.
  const int64_t xt_bytes = align64(L.G * kGroupElems * 4), row_bytes = align64(L.N * 4);
  const int64_t tile_bytes = gemm ? align64(cpu::gemm_scratch_bytes(L.K4)) : 0;
  const int64_t table_bytes = lut ? align64(M * table_stride) : 0;
  const int64_t slot = xt_bytes + row_bytes + tile_bytes + table_bytes;
  const int64_t act_bytes = align64(int_mode ? M * act_stride(L) : M * L.G * kGroupElems * 4);
  const int64_t dot_bytes = align64(M * L.N * (int_mode && !narrow ? 8 : 4));
  uint8_t* ws = t_workspace.get(act_bytes + dot_bytes + align64(packed_bytes) + split.workers() * slot);
  void* act = ws;
  void* dot = ws + act_bytes;
  uint8_t* packed = packed_bytes ? ws + act_bytes + dot_bytes : nullptr;
  uint8_t* slots = ws + act_bytes + dot_bytes + align64(packed_bytes);
  // The zero tail past K of every worker's token buffer (pass 1 writes [0, K) of it per token).
  // Only the tail: a batch-1 call over a large layer finds its scratch evicted by the previous
  // call's codes, and clearing all of it (16 KB per worker at K = 4096) cost ~1.3 us of a 4096 x
  // 4096 call's ~18 us of set-up.
  for (int64_t w = 0; w < split.workers(); ++w)
    std::memset(slots + w * slot + L.K * 4, 0, xt_bytes - L.K * 4);
  const auto xt_of = [&](int64_t w) { return reinterpret_cast<float*>(slots + w * slot); };
  const auto row_of = [&](int64_t w) { return reinterpret_cast<float*>(slots + w * slot + xt_bytes); };
  // (lut modes: the kernel reads the worker's tables, table_stride bytes per token, instead of the
  // activations; multiply() points act at them)
  const cpu::IntArgs int_args{(mode == Mode::kLut3 && !gemm ? L.lut3_codes : L.codes).data_ptr<uint8_t>(), L.N, L.K4,
                              L.G, static_cast<const int8_t*>(act),
                              lut ? table_stride : act_stride(L), M,
                              narrow ? static_cast<int32_t*>(dot) : nullptr,
                              narrow ? nullptr : static_cast<int64_t*>(dot), nullptr, packed};
  const int64_t packed_block = packed ? set.packed_bytes(cpu::kPackTokenBlock, L.G) : 0;
  const auto tokens_of = [&](int64_t m0, int64_t m1) {  // int_args for tokens [m0, m1), m0 a multiple of the block
    cpu::IntArgs mine = int_args;
    mine.act += m0 * mine.act_stride;
    mine.M = m1 - m0;
    if (mine.out32) mine.out32 += m0 * L.N;
    if (mine.out64) mine.out64 += m0 * L.N;
    if (mine.packed) mine.packed += m0 / cpu::kPackTokenBlock * packed_block;
    return mine;
  };
  const auto prepare = [&](int64_t m0, int64_t m1, int64_t w) {
    prepare_tokens(xp, L, math, mode, /*plane=*/mode == Mode::kFloat || !gemm, m0, m1, act, scale.data(), cst.data(),
                   xt_of(w));
    for (int64_t m = m0; lut3_gemm && m < m1; ++m)
      lut3_cst[m] = lut3_requantize(static_cast<int8_t*>(act) + m * act_stride(L), L.G * kGroupCodes);
    if (!packed) return;
    // The operands for the tokens of the kernel call that reads them, whose count picks their
    // layout (the tile kernel's narrow one up to 8 tokens): split by tokens, this thread's range
    // is its own call; split by rows, every call takes all M tokens.
    const int64_t base = split.by_tokens ? m0 : 0;
    const cpu::IntArgs call = split.by_tokens ? tokens_of(m0, m1) : int_args;
    uint8_t* dst = packed + base / cpu::kPackTokenBlock * packed_block;  // (call.packed, writable)
    for (int64_t m = m0; m < m1; m += cpu::kPackTokenBlock)  // (m0: a multiple of the block)
      set.pack_tokens(call, m - base, std::min(cpu::kPackTokenBlock, m1 - m), dst);
  };
  if (int_mode) {
    const cpu::IntKernel kernel = lut ? lut_gemv : gemm ? set.int_gemm : set.int_gemv;
    std::vector<uint8_t> tables_made(lut ? split.workers() * M : 0);  // per worker and token
    const auto multiply = [&](int64_t n0, int64_t n1, int64_t m0, int64_t m1, int64_t w) {
      cpu::IntArgs mine = tokens_of(m0, m1);
      mine.scratch = reinterpret_cast<uint32_t*>(slots + w * slot + xt_bytes + row_bytes);
      if (lut) {
        uint8_t* tables = slots + w * slot + xt_bytes + row_bytes + tile_bytes;
        for (int64_t m = m0; m < m1; ++m)
          if (!tables_made[w * M + m]) {
            lut_tables(static_cast<const int8_t*>(act) + m * act_stride(L), L.K4, tables + m * table_stride);
            tables_made[w * M + m] = 1;
          }
        mine.act = reinterpret_cast<const int8_t*>(tables + m0 * table_stride);
      }
      kernel(mine, n0, n1);
    };
    // mode lut3 on the GEMM: its dot products of z and q3 made the lut3 GEMV's V (exact: V fits
    // the output type as int mode's does, kernel_api.h), computed in the unsigned type of that
    // width, whose wrapping products give the same bits and vectorize (int64 products took ~6 % of
    // a MiniLM layer's calls at 128 tokens)
    const auto lut3_finish = [&](auto* d, int64_t m0, int64_t m1) {
      using U = std::make_unsigned_t<std::remove_reference_t<decltype(*d)>>;
      for (int64_t m = m0; lut3_gemm && m < m1; ++m) {
        U* v = reinterpret_cast<U*>(d + m * L.N);
        const U c = static_cast<U>(lut3_cst[m]);
        for (int64_t n = 0; n < L.N; ++n) v[n] = static_cast<U>(cpu::kLut3Step) * v[n] + c;
      }
    };
    if (narrow) {
      split.run(prepare, multiply, [&](int64_t m0, int64_t m1, int64_t w) {
        lut3_finish(static_cast<int32_t*>(dot), m0, m1);
        finish_tokens(static_cast<const int32_t*>(dot), L, math, m0, m1, scale.data(), cst.data(), yp, row_of(w));
      });
    } else {
      split.run(prepare, multiply, [&](int64_t m0, int64_t m1, int64_t w) {
        lut3_finish(static_cast<int64_t*>(dot), m0, m1);
        finish_tokens(static_cast<const int64_t*>(dot), L, math, m0, m1, scale.data(), cst.data(), yp, row_of(w));
      });
    }
  } else {
    const cpu::FloatArgs args{L.codes.data_ptr<uint8_t>(), L.N, L.K4, L.G, static_cast<const float*>(act), M,
                              static_cast<float*>(dot)};
    split.run(prepare, [&](int64_t n0, int64_t n1, int64_t, int64_t, int64_t) { set.float_gemv(args, n0, n1); },
              [&](int64_t m0, int64_t m1, int64_t w) {
                finish_tokens(static_cast<const float*>(dot), L, math, m0, m1, scale.data(), cst.data(), yp, row_of(w));
              });
  }
}

// One call on a checked layer: the algorithm (GEMV or GEMM) from the real M, then the kernel.
torch::Tensor run_layer(const torch::Tensor& x, const Layer& L, const KernelSet& set, Mode mode,
                        const std::string& algo) {
  check_input(x, L);
  TORCH_CHECK_VALUE(algo == "auto" || algo == "gemv" || algo == "gemm", "algo must be 'auto', 'gemv' or 'gemm', got '",
                    algo, "'");
  // (mode lut3 takes the GEMM past its own token count, kernel_api.h lut3_gemv_max_tokens, on the
  // same 12-bit activations: the same V)
  const bool gemm_possible = (mode == Mode::kInt || mode == Mode::kLut3) && set.int_gemm != nullptr;
  TORCH_CHECK_VALUE(algo != "gemm" || gemm_possible, "algo 'gemm' needs mode 'int' and an isa with a GEMM ('",
                    set.name, "' has ", set.int_gemm ? "one" : "none", ")");
  const int64_t gemv_max = mode == Mode::kLut3 ? cpu::lut3_gemv_max_tokens(L.N * L.K4, L.K4)
                                               : cpu::gemv_max_tokens(L.N * L.K4, L.K4);
  const bool gemm = gemm_possible && (algo == "gemm" || (algo == "auto" && x.size(0) > gemv_max));
  // (past the dispatcher: torch::empty took ~0.7 us of a MiniLM layer call's ~1.1 us of set-up,
  // at::empty_cpu ~0.5, most of it the allocation itself)
  torch::Tensor y = at::detail::empty_cpu({x.size(0), L.N}, x.scalar_type(), /*pin_memory=*/false, c10::nullopt);
  if (x.size(0) == 0) return y;
  switch (x.scalar_type()) {
    case torch::kFloat: qlinear_impl<float>(x, L, set, mode, gemm, y); break;
    case torch::kBFloat16: qlinear_impl<c10::BFloat16>(x, L, set, mode, gemm, y); break;
    default: qlinear_impl<c10::Half>(x, L, set, mode, gemm, y); break;
  }
  return y;
}

}  // namespace

torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                      const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                      const torch::Tensor& w_scale, int64_t had_in, int64_t had_out,
                      const c10::optional<torch::Tensor>& bias, const std::string& isa_name_arg,
                      const std::string& mode_name, const std::string& algo) {
  const KernelSet& set = parse_isa(isa_name_arg, "isa");
  const Layer L = check_layer(codes, A, b, su, sv, w_scale, had_in, had_out, bias, *set.math);
  return run_layer(x, L, set, parse_mode(mode_name), algo);
}

torch::Tensor frozen_qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& params,
                             int64_t had_in, int64_t had_out) {
  const KernelSet& set = parse_isa("", "isa");
  const Layer L = layer_from_params(codes, params, had_in, had_out);
  return run_layer(x, L, set, parse_mode(""), "auto");
}

torch::Tensor lut_qlinear(const torch::Tensor& x, const torch::Tensor& lut_codes, const torch::Tensor& params,
                          int64_t had_in, int64_t had_out) {
  const KernelSet& set = parse_isa("", "isa");
  const Layer L = layer_from_params(lut_codes, params, had_in, had_out);
  return run_layer(x, L, set, Mode::kLut, "auto");
}

torch::Tensor lut3_qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& lut3_codes,
                           const torch::Tensor& params, int64_t had_in, int64_t had_out) {
  const KernelSet& set = parse_isa("", "isa");
  const Layer L = layer_from_lut3(codes, lut3_codes, params, had_in, had_out);
  return run_layer(x, L, set, Mode::kLut3, "auto");
}

bool has_lut3_kernel() {
  int n;
  const KernelSet& set = parse_isa("", "isa");
  return set.runs_lut3() && &set != &cpu::kernel_sets(&n)[0];  // (the portable set's: the reference)
}

bool has_lut_kernel() {
  int n;
  const KernelSet& set = parse_isa("", "isa");
  return set.lut_gemv != nullptr && &set != &cpu::kernel_sets(&n)[0];  // (the portable set's: the reference)
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
  const Layer L = check_layer(codes, A, b, su, ones, torch::ones({}), had_in, 0, c10::nullopt, cpu::kPortableMath);
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
void set_mode(const std::string& name) {
  TORCH_CHECK_VALUE(name == "auto" || name == "int" || name == "float" || name == "lut" || name == "lut3",
                    "mode must be 'auto', 'int', 'float', 'lut' or 'lut3', got '", name, "'");
  g_mode.store(name == "auto"    ? kAutoMode
               : name == "lut"  ? static_cast<int>(Mode::kLut)
               : name == "lut3" ? static_cast<int>(Mode::kLut3)
                                : static_cast<int>(parse_mode(name)));
}
std::string layer_mode(int64_t out_features, int64_t k4) {
  TORCH_CHECK_VALUE(out_features >= 0 && k4 >= 0, "out_features and k4 must be >= 0, got ", out_features, " and ",
                    k4);
  const KernelSet& set = parse_isa("", "isa");
  if (g_mode.load() == kAutoMode && set.lut3_by_default && set.lut3_by_default() && has_lut3_kernel() &&
      out_features * k4 >= cpu::kSmallLayerCodeBytes)
    return "lut3";
  return get_mode(true);
}
std::string get_mode(bool resolve) {
  int mode = g_mode.load();
  if (mode == kAutoMode) {
    if (!resolve) return "auto";
    mode = static_cast<int>(parse_isa("", "isa").lut_by_default ? Mode::kLut : Mode::kInt);
  }
  switch (static_cast<Mode>(mode)) {
    case Mode::kFloat: return "float";
    case Mode::kLut: return "lut";
    case Mode::kLut3: return "lut3";
    default: return "int";
  }
}

}  // namespace pyquant
