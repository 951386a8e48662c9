// Branch-free scalar math written so that GCC vectorises loops calling it
// (with -O3 -fopenmp-simd -fno-trapping-math, which lets it if-convert the clamps): exp and tanh accurate to a few ulp in f32.
// std::exp would not vectorise without -ffast-math and glibc's vector ABI.
#pragma once
#include <cstdint>

namespace rf {
namespace RF_ISA {

// exp(x) by range reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial
// (Cephes expf coefficients); 2^n is built in the exponent bits. Clamped to the f32 range.
__attribute__((always_inline)) static inline float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // Adding and removing 1.5 * 2^23 rounds to the nearest integer (ties to even) in the
  // default rounding mode, without a library call that would stop vectorisation.
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln2 split in two for an exact first step
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);  // 2^n; memcpy here would block vectorisation
}

// tanh(x) = 1 - 2 / (exp(2x) + 1); for small |x| use x - x^3/3 + 2x^5/15 to keep relative accuracy.
__attribute__((always_inline)) static inline float tanh_f32(float x) {
  float big = 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f);
  float x2 = x * x;
  float small = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  return (x2 < 0.0025f) ? small : big;
}

}  // namespace RF_ISA
}  // namespace rf
