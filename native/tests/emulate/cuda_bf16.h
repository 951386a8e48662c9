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
