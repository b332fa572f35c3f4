// pyquant._C: the CPU operators.
//
// The quantized linear layer is a torch operator in the `pyquant` library (torch.ops.pyquant.*), so
// torch.compile, torch.export and autograd see one opaque, shape-checked op per layer. Its fake
// (shape) implementation and autograd formula are registered from Python in pyquant/ops.py, which
// also holds every other op of the library (the CUDA extension adds its ops as a fragment).
//
// The pybind11 module keeps what is not on the hot path: code packing, the activation transform
// alone (for tests) and the process-wide ISA / mode switches.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The public op: the kernel's own choice of ISA (set_isa), mode (set_mode) and algorithm.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                     const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                     const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t had_in,
                     int64_t had_out) {
  return pyquant::qlinear(x, codes, A, b, su, sv, w_scale, had_in, had_out, bias, "", "", "auto");
}

// The same kernel with every path selectable, for tests and benchmarks.
torch::Tensor cpu_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                         const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                         const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t had_in,
                         int64_t had_out, c10::string_view isa, c10::string_view mode, c10::string_view algo) {
  return pyquant::qlinear(x, codes, A, b, su, sv, w_scale, had_in, had_out, bias, std::string(isa),
                          std::string(mode), std::string(algo));
}

// pyquant::linear through the dispatcher (below autograd, the caller holds the guard).
torch::Tensor call_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                          const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                          const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t had_in,
                          int64_t had_out) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyquant::linear", "").typed<decltype(linear)>();
  return op.call(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out);
}

// Autograd for pyquant::linear on every device. In C++ so that a call that needs no gradient
// (inference, no_grad, frozen layers) costs no Python; the gradient formula itself is one op,
// pyquant::linear_backward, written in torch ops in pyquant/ops.py and shared with the Triton op.
class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& codes,
                               const torch::Tensor& A, const torch::Tensor& b, const torch::Tensor& su,
                               const torch::Tensor& sv, const torch::Tensor& w_scale,
                               const c10::optional<torch::Tensor>& bias, int64_t had_in, int64_t had_out) {
    at::AutoDispatchBelowADInplaceOrView below;
    std::vector<torch::Tensor> saved = {x, codes, A, b, su, sv, w_scale};
    if (bias.has_value()) saved.push_back(*bias);
    ctx->save_for_backward(saved);
    ctx->saved_data["had_in"] = had_in;
    ctx->saved_data["had_out"] = had_out;
    return call_linear(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pyquant::linear_backward", "")
                               .typed<std::vector<torch::Tensor>(
                                   const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                   const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                   const torch::Tensor&, const torch::Tensor&, const c10::optional<torch::Tensor>&,
                                   int64_t, int64_t, c10::ArrayRef<bool>)>();
    const auto s = ctx->get_saved_variables();
    const bool has_bias = s.size() == 8;
    const c10::optional<torch::Tensor> bias = has_bias ? c10::optional<torch::Tensor>(s[7]) : c10::nullopt;
    // Which of x, A, b, su, sv, w_scale, bias need a gradient (codes never get one).
    const bool need[7] = {ctx->needs_input_grad(0), ctx->needs_input_grad(2), ctx->needs_input_grad(3),
                          ctx->needs_input_grad(4), ctx->needs_input_grad(5), ctx->needs_input_grad(6),
                          has_bias && ctx->needs_input_grad(7)};
    const auto g = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], bias,
                           ctx->saved_data["had_in"].toInt(), ctx->saved_data["had_out"].toInt(),
                           c10::ArrayRef<bool>(need, 7));
    // linear_backward returns [dx, dA, db, dsu, dsv, dw_scale, dbias], empty where not needed
    const auto pick = [&](int i) { return need[i] ? g[i] : torch::Tensor(); };
    return {pick(0), torch::Tensor(), pick(1), pick(2), pick(3), pick(4), pick(5), pick(6), torch::Tensor(),
            torch::Tensor()};
  }
};

torch::Tensor linear_autograd(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                              const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                              const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t had_in,
                              int64_t had_out) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || A.requires_grad() || b.requires_grad() || su.requires_grad() ||
                           sv.requires_grad() || w_scale.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (needs_grad) return LinearFunction::apply(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out);
  // No graph to record: straight to the kernel (LinearFunction would still build a node and save
  // its inputs, about 2 us a call, a tenth of a small layer's).
  at::AutoDispatchBelowADInplaceOrView below;
  return call_linear(x, codes, A, b, su, sv, w_scale, bias, had_in, had_out);
}

// frozen_linear and lut_linear have no gradient (their params are a copy): a call that would need
// one is an error, not a result autograd silently cuts off from the layer's tensors. (Both have
// frozen_qlinear's signature; kOp names the op.)
constexpr char kFrozenLinear[] = "pyquant::frozen_linear";
constexpr char kLutLinear[] = "pyquant::lut_linear";
template <const char* kOp>
torch::Tensor no_gradient_autograd(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& params,
                                   int64_t had_in, int64_t had_out) {
  TORCH_CHECK_VALUE(!at::GradMode::is_enabled() || !(x.requires_grad() || params.requires_grad()), kOp,
                    " has no gradient; a call that needs one takes pyquant::linear");
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kOp, "").typed<decltype(pyquant::frozen_qlinear)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, codes, params, had_in, had_out);
}

constexpr char kLut3Linear[] = "pyquant::lut3_linear";
torch::Tensor lut3_no_gradient(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& lut3_codes,
                               const torch::Tensor& params, int64_t had_in, int64_t had_out) {
  TORCH_CHECK_VALUE(!at::GradMode::is_enabled() || !(x.requires_grad() || params.requires_grad()), kLut3Linear,
                    " has no gradient; a call that needs one takes pyquant::linear");
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kLut3Linear, "").typed<decltype(pyquant::lut3_qlinear)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, codes, lut3_codes, params, had_in, had_out);
}

}  // namespace

TORCH_LIBRARY(pyquant, m) {
  // Where the fake implementations and autograd formulas live: torch imports it when it needs them
  // (e.g. loading an exported program in a fresh process).
  m.set_python_module("pyquant.ops");
  m.def(
      "linear(Tensor x, Tensor codes, Tensor A, Tensor b, Tensor su, Tensor sv, Tensor w_scale, Tensor? bias, "
      "int had_in, int had_out) -> Tensor");
  // linear for a call that needs no gradient, on the layer's frozen params (ops.h: kParamsHead):
  // five tensors fewer per call for torch.compile's guards and checks to go through.
  m.def("frozen_linear(Tensor x, Tensor codes, Tensor params, int had_in, int had_out) -> Tensor");
  // frozen_linear in mode "lut" (csrc/cpu/kernel_api.h): lut_codes are the codes in the LUT layout
  // (_C.pack_lut_codes), the activations keep 14 bits and the products come from table lookups.
  m.def("lut_linear(Tensor x, Tensor lut_codes, Tensor params, int had_in, int had_out) -> Tensor");
  // frozen_linear in mode "lut3" (kernel_api.h): lut3_codes are the codes in the LUT3 layout
  // (_C.pack_lut3_codes), the activations keep ~12 bits (q / 18), one table lookup serves three
  // weights; past the GEMV's token count the int GEMM multiplies the same 12-bit activations by
  // `codes` (natural layout), with the same result.
  m.def("lut3_linear(Tensor x, Tensor codes, Tensor lut3_codes, Tensor params, int had_in, int had_out) -> Tensor");
  m.def(
      "cpu_linear(Tensor x, Tensor codes, Tensor A, Tensor b, Tensor su, Tensor sv, Tensor w_scale, Tensor? bias, "
      "int had_in, int had_out, *, str isa=\"\", str mode=\"\", str algo=\"auto\") -> Tensor");
  // The gradients of linear: [dx, dA, db, dsu, dsv, dw_scale, dbias] for the inputs flagged in
  // `needs` (in that order), empty tensors for the others. Implemented in pyquant/ops.py.
  m.def(
      "linear_backward(Tensor grad, Tensor x, Tensor codes, Tensor A, Tensor b, Tensor su, Tensor sv, "
      "Tensor w_scale, Tensor? bias, int had_in, int had_out, bool[] needs) -> Tensor[]");
  // UniSVQ's fit: per row of lin [M, 4], argmax_c lin . cb2t[:, c] - norms[c] (long [M]).
  m.def("nearest_codeword(Tensor lin, Tensor cb2t, Tensor norms) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyquant, CPU, m) {
  m.impl("linear", &linear);
  m.impl("frozen_linear", &pyquant::frozen_qlinear);
  m.impl("lut_linear", &pyquant::lut_qlinear);
  m.impl("lut3_linear", &pyquant::lut3_qlinear);
  m.impl("cpu_linear", &cpu_linear);
  m.impl("nearest_codeword", &pyquant::nearest_codeword);
}

TORCH_LIBRARY_IMPL(pyquant, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("frozen_linear", &no_gradient_autograd<kFrozenLinear>);
  m.impl("lut_linear", &no_gradient_autograd<kLutLinear>);
  m.impl("lut3_linear", &lut3_no_gradient);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "pyquant CPU kernels; the layer op is torch.ops.pyquant.linear";
  m.def("pack_codes", &pyquant::pack_codes, "pack levels [N, K] uint8 into codes [N, K/4]");
  m.def("unpack_codes", &pyquant::unpack_codes, "unpack codes [N, K/4] into levels [N, K]");
  m.def("pack_lut_codes", &pyquant::pack_lut_codes, "codes [N, K/4] in the LUT layout that lut_linear reads",
        py::arg("codes"));
  m.def("pack_lut3_codes", &pyquant::pack_lut3_codes,
        "codes [N, K/4] in the LUT3 layout that lut3_linear reads: [ceil(N/128), ceil(K/24) * 768] uint8",
        py::arg("codes"));
  m.def("has_lut3_kernel", &pyquant::has_lut3_kernel,
        "whether the kernel set in use runs its own triple-lookup kernels (mode 'lut3') on this CPU");
  m.def("has_lut_kernel", &pyquant::has_lut_kernel,
        "whether the kernel set in use has its own table-lookup kernels (mode 'lut')");
  m.def("in_huge_pages", &pyquant::in_huge_pages,
        "t itself if under 2 MB, already there or without huge pages (not Linux), else a copy in 2 MB pages",
        py::arg("t"));
  m.def("zeros_in_huge_pages", &pyquant::zeros_in_huge_pages,
        "zeros in 2 MB pages, untouched pages costing no memory (torch.zeros under 2 MB or without huge pages)",
        py::arg("sizes"), py::arg("dtype"));
  m.def("page_out", &pyquant::page_out,
        "ask the OS to reclaim t's whole pages now (a file mapping's; not torch's or in_huge_pages memory); nothing is lost", py::arg("t"));
  m.def("is_in_huge_pages", &pyquant::is_in_huge_pages, "whether t's memory is an in_huge_pages mapping",
        py::arg("t"));
  m.def("transform_activations", &pyquant::transform_activations,
        "(xt [M, K] fp32, const [M] fp32): the kernels' activation transform, as format.transform_activations",
        py::arg("x"), py::arg("su"), py::arg("A"), py::arg("b"), py::arg("had_in"));
  m.def("set_isa", &pyquant::set_isa, "force a kernel set of supported_isas() for calls with isa='' ('auto' undoes)",
        py::arg("name"));
  m.def("get_isa", &pyquant::get_isa, "the ISA the kernels use when called with isa=''");
  m.def("supported_isas", &pyquant::supported_isas, "the ISAs this CPU runs, slowest first");
  m.def("set_mode", &pyquant::set_mode,
        "default mode for calls with mode='': 'auto' (the initial one: 'lut' where the kernel set's lut kernel "
        "is the faster, else 'int'; for layers built under it, layer_mode()), 'int', 'float', 'lut' or 'lut3' (int for the ops on natural-layout codes; "
        "layers built under it run lut_linear where has_lut_kernel(), lut3_linear where has_lut3_kernel())",
        py::arg("name"));
  m.def("layer_mode", &pyquant::layer_mode,
        "the mode a layer of out_features x 4 k4 weights is built in: get_mode(), except under 'auto' where the "
        "kernel set prefers lut3 for layers of 1 MB of codes or more on this CPU (avx512 on AMD with VBMI2)",
        py::arg("out_features"), py::arg("k4"));
  m.def("get_mode", &pyquant::get_mode,
        "the default mode: what it runs ('auto' resolved for the current kernel set), or with resolve=False the "
        "setting itself",
        py::arg("resolve") = true);
}
