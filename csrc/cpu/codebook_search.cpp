// Exact nearest-codeword search, the inner step of UniSVQ's fit (LDLQ and coordinate descent run it
// once per code vector, thousands of times per layer):
//
//   out[m] = argmax_c  lin[m, :] . cb2t[:, c] - norms[c]      (the first index on ties, like torch)
//
// With lin = w G, cb2t = 2 cbᵀ and norms[c] = c G cᵀ this is the codeword nearest to w in metric G.
// torch computes it as an [M, C] score matrix and an argmax over it; here each score lives in a register
// for one compare.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace pyquant {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYQUANT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYQUANT_CLONES
#endif

constexpr int kTile = 16;  // rows scored together: one vector register per row quantity

// out[0..rows) for up to kTile rows of lin. Vectorized across rows: each codeword in turn is scored
// against every row of the tile, and a row's best value and index move only on a strictly better
// score, which keeps the first maximum. A NaN score wins (torch's argmax convention), so bad input
// is not hidden behind a valid-looking index.
PYQUANT_CLONES
void best_of_tile(const float* lin, int64_t rows, const float* cb2t, const float* norms, int64_t n_codes,
                  int64_t* out) {
  float l[4][kTile] = {}, best_v[kTile], poison[kTile];  // poison: NaN once a score was NaN or infinite
  int32_t best_i[kTile];
  for (int64_t r = 0; r < rows; ++r)
    for (int p = 0; p < 4; ++p) l[p][r] = lin[4 * r + p];
  for (int r = 0; r < kTile; ++r) best_v[r] = -INFINITY, best_i[r] = 0, poison[r] = 0.f;
  for (int64_t c = 0; c < n_codes; ++c) {
    const float c0 = cb2t[c], c1 = cb2t[n_codes + c], c2 = cb2t[2 * n_codes + c], c3 = cb2t[3 * n_codes + c];
    const float nc = norms[c];
    const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
    for (int r = 0; r < kTile; ++r) {
      const float s = l[0][r] * c0 + l[1][r] * c1 + l[2][r] * c2 + l[3][r] * c3 - nc;
      const bool better = s > best_v[r];
      best_v[r] = better ? s : best_v[r];
      best_i[r] = better ? ci : best_i[r];
      poison[r] += s - s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = best_i[r];
    if (poison[r] != 0.f) {  // rare: torch's rule on the exact scores (the first NaN, else the first maximum)
      const auto score = [&](int64_t c) {
        return l[0][r] * cb2t[c] + l[1][r] * cb2t[n_codes + c] + l[2][r] * cb2t[2 * n_codes + c] +
               l[3][r] * cb2t[3 * n_codes + c] - norms[c];
      };
      float best = score(0);
      out[r] = 0;
      for (int64_t c = 0; c < n_codes; ++c) {
        const float s = score(c);
        if (s != s) {
          out[r] = c;
          break;
        }
        if (s > best) best = s, out[r] = c;
      }
    }
  }
}

}  // namespace

torch::Tensor nearest_codeword(const torch::Tensor& lin, const torch::Tensor& cb2t, const torch::Tensor& norms) {
  TORCH_CHECK_TYPE(lin.scalar_type() == torch::kFloat && cb2t.scalar_type() == torch::kFloat &&
                       norms.scalar_type() == torch::kFloat,
                   "lin, cb2t and norms must be float32");
  TORCH_CHECK_VALUE(lin.dim() == 2 && lin.size(1) == 4, "lin must be [M, 4], got ", lin.sizes());
  TORCH_CHECK_VALUE(cb2t.dim() == 2 && cb2t.size(0) == 4 && cb2t.size(1) > 0, "cb2t must be [4, C], got ",
                    cb2t.sizes());
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.size(0) == cb2t.size(1), "norms must be [C] with C = ",
                    cb2t.size(1), ", got ", norms.sizes());
  TORCH_CHECK_VALUE(lin.device().is_cpu() && cb2t.device().is_cpu() && norms.device().is_cpu(),
                    "nearest_codeword runs on CPU tensors");
  const auto l = lin.contiguous();
  const auto cb = cb2t.contiguous();
  const auto nr = norms.contiguous();
  const int64_t m = l.size(0), n_codes = cb.size(1);
  auto out = torch::empty({m}, lin.options().dtype(torch::kLong));
  const float* lp = l.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  const float* np = nr.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, (m + kTile - 1) / kTile, 32, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      best_of_tile(lp + 4 * kTile * t, std::min<int64_t>(kTile, m - kTile * t), cp, np, n_codes, op + kTile * t);
  });
  return out;
}

}  // namespace pyquant
