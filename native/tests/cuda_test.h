// What the CUDA kernel tests (native/tests/cuda_*.cpp) share: device memory that frees itself,
// uploads and downloads, the random draws, sentinels past the end of an output (so a write past
// it shows), and the check that a launch ran. Header-only, on the CUDA runtime alone (the
// emulation's too). Each test seeds the generator once, first thing in main.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tests/check.h"
#include "tests/random_model.h"

namespace rf::test::cuda {

inline std::mt19937& rng() {
  static std::mt19937 generator;
  return generator;
}

inline std::vector<float> randn(size_t n, float sd = 1.f, float mean = 0.f) { return rf::test::randn(rng(), n, sd, mean); }

inline std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Sentinel floats past the end of an output: a NaN payload no kernel computes.
constexpr uint32_t kSentinelBits = 0x7fc0beefu;
constexpr size_t kTail = 37;

inline float sentinel() {
  float f;
  std::memcpy(&f, &kSentinelBits, 4);
  return f;
}

// Device memory that frees itself (null when cudaMalloc fails: the launch check reports it).
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Dev(size_t n_bytes) : bytes(n_bytes) {
    if (cudaMalloc(&p, n_bytes ? n_bytes : 1) != cudaSuccess) p = nullptr;
  }
  Dev(Dev&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  Dev& operator=(Dev&&) = delete;
  ~Dev() {
    if (p) cudaFree(p);
  }
  float* f() const { return static_cast<float*>(p); }
  int32_t* i() const { return static_cast<int32_t*>(p); }
};

// v's values into d (which holds at least as many bytes).
template <class T>
void put(const Dev& d, const std::vector<T>& v) {
  if (d.p && !v.empty()) cudaMemcpy(d.p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
}

template <class T>
Dev upload(const std::vector<T>& v) {
  Dev d(v.size() * sizeof(T));
  put(d, v);
  return d;
}

template <class T>
std::vector<T> download(const Dev& d, size_t n) {
  std::vector<T> v(n);
  if (d.p && n) cudaMemcpy(v.data(), d.p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

// An output of n floats followed by kTail sentinels.
inline Dev output(size_t n) { return upload(std::vector<float>(n + kTail, sentinel())); }

// Whether floats [from, v.size()) are all the sentinel.
inline bool tail_intact(const std::vector<float>& v, size_t from) {
  for (size_t i = from; i < v.size(); ++i)
    if (bits(v[i]) != kSentinelBits) return false;
  return true;
}

// Waits for the device and checks that the launch (and everything before it) succeeded.
inline bool ran(const std::string& what) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  check(e == cudaSuccess, what + ": ran (" + cudaGetErrorString(e) + ")");
  return e == cudaSuccess;
}

}  // namespace rf::test::cuda
