#pragma once
// A float64 reference of the NF4 encoder, shared by the NF4 tests.

#include <lora/quant/nf4.hpp>

#include <cmath>

namespace lora::test {

/// The nearest NF4 code of x (a value already divided by its block's absmax), in float64.
/// Ties (exact midpoints) aside; differs from the library's threshold tree only at a
/// threshold's own float.
inline int nearest_nf4_code(double x) {
  int best = 0;
  for (int c = 1; c < 16; ++c)
    if (std::abs(quant::nf4_code[c] - x) < std::abs(quant::nf4_code[best] - x)) best = c;
  return best;
}

}  // namespace lora::test
