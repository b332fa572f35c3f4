// Inputs the timing harnesses (kernel_bench.cpp, lut3_ab.cpp) share.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernel_api.h"

// M tokens of int-mode activations (plane layout, G groups) as the int-mode transform makes them
// from normal inputs (each token scaled to its largest, ~4 standard deviations at these K): mode
// lut3's narrow chunks (kernel_api.h) are then as common as in use; uniform random bytes would make
// almost every chunk wide.
inline std::vector<int8_t> normal_activations(int64_t M, int64_t G, std::mt19937& rng) {
  using namespace pyquant::cpu;
  std::vector<int8_t> act(M * G * 512);
  std::normal_distribution<double> normal(0.0, kQMax / 4.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t e = 0; e < 256; ++e) {
        const int q = static_cast<int>(std::lround(std::clamp(normal(rng), -double(kQMax), double(kQMax))));
        split_q(q, &act[m * G * 512 + g * 512 + e], &act[m * G * 512 + g * 512 + 256 + e]);
      }
  return act;
}
