// __nv_bfloat16 for the CPU emulation (see emu.cpp): bits and the conversion to float.
#pragma once
#include <cstdint>
#include <cstring>
#include "cuda_runtime.h"
struct __nv_bfloat16_raw { uint16_t x; };
struct __nv_bfloat16 {
  uint16_t x = 0;
  __nv_bfloat16() = default;
  __nv_bfloat16(__nv_bfloat16_raw r) : x(r.x) {}
};
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.x) << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) b.x = uint16_t((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  else b.x = uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);             // nearest, ties to even
  return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
