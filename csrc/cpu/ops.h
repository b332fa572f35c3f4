// The operators pyquant._C exposes (bound to Python in module.cpp).
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

namespace pyquant {

// pack.cpp
torch::Tensor pack_codes(const torch::Tensor& z);
torch::Tensor unpack_codes(const torch::Tensor& codes);
// codes [N, K/4] in the LUT layout of the table-lookup kernels (csrc/cpu/kernel_api.h), same shape
torch::Tensor pack_lut_codes(const torch::Tensor& codes);
// codes [N, K/4] in the LUT3 layout of the triple-lookup kernels (kernel_api.h): [ceil(N / 128), ceil(K / 24) * 768]
torch::Tensor pack_lut3_codes(const torch::Tensor& codes);

// huge_pages.cpp: `t` itself when it is under 2 MB, already there or the OS has no transparent
// huge pages (not Linux), else a copy in a 2 MB-aligned mapping advised MADV_HUGEPAGE
torch::Tensor in_huge_pages(const torch::Tensor& t);
// zeros of these sizes in such a mapping where they are 2 MB or more (untouched pages cost no
// memory: a layer's codes before they are loaded), else torch::zeros
torch::Tensor zeros_in_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype);
// Asks the OS to reclaim the whole pages of t's bytes now (Linux MADV_PAGEOUT): pages of a file
// mapping (a safetensors checkpoint) are dropped and read again if touched, anonymous ones go to
// swap where there is swap; nothing is lost. Memory of torch's allocator and in_huge_pages
// mappings is left alone (anonymous: see page_out). Whether the advice was given.
bool page_out(const torch::Tensor& t);
bool is_in_huge_pages(const torch::Tensor& t);

// codebook_search.cpp
torch::Tensor nearest_codeword(const torch::Tensor& lin, const torch::Tensor& cb2t, const torch::Tensor& norms);

// qlinear.cpp
// frozen_qlinear's params, fp32: [A (16, row-major) | b (4) | w_scale | 11 zeros | su (K) | sv (N) | bias (N),
// if the layer has one], a layer's small tensors laid out once when its kernel state is built
// (pyquant.backends.cpu.frozen_params), so that a call passes one tensor for six and converts none.
constexpr int64_t kParamsHead = 32;
torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& A,
                      const torch::Tensor& b, const torch::Tensor& su, const torch::Tensor& sv,
                      const torch::Tensor& w_scale, int64_t had_in, int64_t had_out,
                      const c10::optional<torch::Tensor>& bias, const std::string& isa,
                      const std::string& mode, const std::string& algo);
torch::Tensor frozen_qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& params,
                             int64_t had_in, int64_t had_out);
// frozen_qlinear in mode "lut": lut_codes from pack_lut_codes (14-bit activations, table lookups)
torch::Tensor lut_qlinear(const torch::Tensor& x, const torch::Tensor& lut_codes, const torch::Tensor& params,
                          int64_t had_in, int64_t had_out);
// whether the kernel set in use has its own table-lookup kernels (else lut_qlinear runs the portable ones)
bool has_lut_kernel();
// frozen_qlinear in mode "lut3": lut3_codes = pack_lut3_codes(codes) (~12-bit activations, one lookup
// per three weights; many tokens: the int GEMM on `codes` with the same activations, the same result)
torch::Tensor lut3_qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& lut3_codes,
                           const torch::Tensor& params, int64_t had_in, int64_t had_out);
// whether the kernel set in use runs its own triple-lookup kernels on this CPU (else the portable ones)
bool has_lut3_kernel();
std::tuple<torch::Tensor, torch::Tensor> transform_activations(const torch::Tensor& x, const torch::Tensor& su,
                                                               const torch::Tensor& A, const torch::Tensor& b,
                                                               int64_t had_in);
void set_isa(const std::string& name);
std::string get_isa();
std::vector<std::string> supported_isas();
void set_mode(const std::string& name);
std::string get_mode(bool resolve);
// The mode a layer of out_features x 4 k4 weights is built in: get_mode(true), except under "auto"
// on a kernel set whose lut3_by_default() holds on this CPU and that runs its own lut3 kernel (the
// avx512 set on AMD CPUs with VBMI2), where a layer whose codes
// are kSmallLayerCodeBytes (1 MB) or more is built in "lut3".
std::string layer_mode(int64_t out_features, int64_t k4);

}  // namespace pyquant
