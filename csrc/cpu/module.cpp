// The Python module pyquant._C: every CPU operator, bound in one place.
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "pyquant CPU kernels";
  m.def("pack_codes", &pyquant::pack_codes, "pack levels [N, K] uint8 into codes [N, K/4]");
  m.def("unpack_codes", &pyquant::unpack_codes, "unpack codes [N, K/4] into levels [N, K]");
  m.def("qlinear", &pyquant::qlinear,
        "y = sv * H_out(w_scale * (codebook(codes) . H_in(su * x))) + bias for x [M, K] (fp32/bf16/fp16, "
        "contiguous), in x's dtype. isa: ''|'auto'|'scalar'|'avx2'|'avx512' ('' = set_isa's choice); "
        "mode: ''|'int' (16-bit fixed-point activations, exact integer dot products)|'float' (fp32 "
        "activations); algo: 'auto'|'gemv'|'gemm' (gemm: int mode on avx512, used above 8 tokens)",
        py::arg("x"), py::arg("codes"), py::arg("A"), py::arg("b"), py::arg("su"), py::arg("sv"),
        py::arg("w_scale"), py::arg("had_in"), py::arg("had_out"), py::arg("bias") = py::none(),
        py::arg("isa") = "", py::arg("mode") = "", py::arg("algo") = "auto");
  m.def("transform_activations", &pyquant::transform_activations,
        "(xt [M, K] fp32, const [M] fp32): the kernels' activation transform, as format.transform_activations",
        py::arg("x"), py::arg("su"), py::arg("A"), py::arg("b"), py::arg("had_in"));
  m.def("set_isa", &pyquant::set_isa, "force 'scalar', 'avx2' or 'avx512' for qlinear calls with isa='' ('auto' undoes)",
        py::arg("name"));
  m.def("get_isa", &pyquant::get_isa, "the ISA qlinear uses when called with isa=''");
  m.def("supported_isas", &pyquant::supported_isas, "the ISAs this CPU runs, slowest first");
  m.def("set_mode", &pyquant::set_mode, "default mode for qlinear calls with mode='': 'int' or 'float'",
        py::arg("name"));
  m.def("get_mode", &pyquant::get_mode, "the default mode");
}
