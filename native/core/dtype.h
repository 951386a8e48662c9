// Element types and scalar conversions shared by the loader and the kernels.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rf {

// Element type of a tensor as it arrives from a safetensors file.
enum class SrcType { f32 = 0, f16 = 1, bf16 = 2 };
// Element type the engine keeps weights in.
enum class DType { f32 = 0, bf16 = 1 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as PyTorch's float -> bfloat16 conversion does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reads element i of a source buffer as float.
inline float src_load(const void* src, SrcType t, long i) {
  switch (t) {
    case SrcType::f32: return static_cast<const float*>(src)[i];
    case SrcType::f16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case SrcType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
  }
  return 0.f;
}

// The index of the first NaN or infinity among a source buffer's n elements, or -1 (a bit test:
// the exponent all ones). One such weight makes every answer NaN, which a detector would read as
// "not flagged". Blocks without an early exit, so the common all-finite pass vectorises.
inline long first_non_finite(const void* src, SrcType t, long n) {
  constexpr long block = 4096;
  for (long b = 0; b < n; b += block) {
    const long e = b + block < n ? b + block : n;
    bool bad = false;
    if (t == SrcType::f32) {
      const uint32_t* p = static_cast<const uint32_t*>(src);
      for (long i = b; i < e; ++i) bad |= (p[i] & 0x7f800000u) == 0x7f800000u;
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      const uint16_t mask = t == SrcType::f16 ? 0x7c00u : 0x7f80u;
      for (long i = b; i < e; ++i) bad |= (p[i] & mask) == mask;
    }
    if (bad)
      for (long i = b; i < e; ++i)
        if (!std::isfinite(src_load(src, t, i))) return i;
  }
  return -1;
}

}  // namespace rf
