// Code packing for the pyquant format: z (levels 0..3, [N, K]) <-> codes ([N, K/4] uint8),
// code = 64*z0 + 16*z1 + 4*z2 + z3. Exposed so the build path of pyquant._C is exercised by tests.
#include "ops.h"

#include <algorithm>
#include <vector>

#include "kernel_api.h"

namespace pyquant {

torch::Tensor pack_codes(const torch::Tensor& z) {
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(1) % 4 == 0, "z must be 2-D [N, K] with K % 4 == 0");
  TORCH_CHECK_TYPE(z.scalar_type() == torch::kUInt8, "z must be uint8");
  auto zc = z.contiguous();
  const int64_t n = zc.size(0), k4 = zc.size(1) / 4;
  auto codes = torch::empty({n, k4}, zc.options());
  const uint8_t* src = zc.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  bool bad = false;
#pragma omp parallel for reduction(|| : bad)
  for (int64_t i = 0; i < n * k4; ++i) {
    const uint8_t* q = src + 4 * i;
    bad = bad || ((q[0] | q[1] | q[2] | q[3]) > 3);
    dst[i] = static_cast<uint8_t>((q[0] << 6) | (q[1] << 4) | (q[2] << 2) | q[3]);
  }
  TORCH_CHECK_VALUE(!bad, "z must hold values in 0..3");
  return codes;
}

torch::Tensor unpack_codes(const torch::Tensor& codes) {
  TORCH_CHECK_TYPE(codes.scalar_type() == torch::kUInt8, "codes must be uint8");
  TORCH_CHECK_VALUE(codes.dim() == 2, "codes must be 2-D [N, K/4]");
  auto cc = codes.contiguous();
  const int64_t n = cc.size(0), k4 = cc.size(1);
  auto z = torch::empty({n, 4 * k4}, cc.options());
  const uint8_t* src = cc.data_ptr<uint8_t>();
  uint8_t* dst = z.data_ptr<uint8_t>();
#pragma omp parallel for
  for (int64_t i = 0; i < n * k4; ++i) {
    const uint8_t c = src[i];
    dst[4 * i + 0] = c >> 6;
    dst[4 * i + 1] = (c >> 4) & 3;
    dst[4 * i + 2] = (c >> 2) & 3;
    dst[4 * i + 3] = c & 3;
  }
  return z;
}

namespace {

// A layer's codes [N, K/4] as the table layouts' packers take them: checked, contiguous.
torch::Tensor checked_codes(const torch::Tensor& codes) {
  TORCH_CHECK_TYPE(codes.scalar_type() == torch::kUInt8, "codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(0) > 0 && codes.size(1) > 0,
                    "codes must be non-empty 2-D [N, K/4], got shape ", codes.sizes());
  TORCH_CHECK_VALUE(codes.device().is_cpu(), "codes must be on the CPU, got ", codes.device());
  return codes.contiguous();
}

}  // namespace

torch::Tensor pack_lut_codes(const torch::Tensor& codes) {
  const auto cc = checked_codes(codes);
  const int64_t n = cc.size(0), k4 = cc.size(1);
  // Straight into 2 MB pages, where the CPU backend keeps it: a copy from the heap left the heap
  // holding the freed block, which glibc seldom returns. Zero bytes are not written: a new
  // layer's zero codes pack to pages never touched, which cost no memory.
  auto out = zeros_in_huge_pages({n, k4}, torch::kUInt8);
  const uint8_t* src = cc.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  // per block of rows: the rows of one block share their bytes
#pragma omp parallel for
  for (int64_t nb = 0; nb < (n + cpu::kLutRows - 1) / cpu::kLutRows; ++nb)
    for (int64_t r = nb * cpu::kLutRows; r < std::min(n, (nb + 1) * cpu::kLutRows); ++r)
      for (int64_t j = 0; j < k4; ++j)
        if (src[r * k4 + j] != 0) cpu::lut_pack_byte(n, k4, r, j, src[r * k4 + j], dst);  // (zeros: as made)
  return out;
}

torch::Tensor pack_lut3_codes(const torch::Tensor& codes) {
  const auto cc = checked_codes(codes);
  const int64_t n = cc.size(0), k4 = cc.size(1), chunks = cpu::lut3_chunks(k4);
  auto out = zeros_in_huge_pages({cpu::lut3_groups(n), chunks * cpu::kLut3ChunkBytes}, torch::kUInt8);
  const uint8_t* src = cc.data_ptr<uint8_t>();
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<uint8_t>());
  // each row's element of every s (the same for all rows)
  std::vector<int64_t> element(static_cast<size_t>(chunks * 24));
  for (int64_t s = 0; s < chunks * 24; ++s) element[s] = cpu::lut3_element(k4, s);
#pragma omp parallel for
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t words[3];
      cpu::lut3_chunk_words(src + r * k4, element.data() + 24 * c, words);
      uint16_t* rec = dst + cpu::lut3_word(r, n, chunks, c);
      for (int w = 0; w < 3; ++w)
        if (words[w]) rec[32 * w] = words[w];  // (zeros: as made)
    }
  return out;
}

}  // namespace pyquant
