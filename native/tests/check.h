// Tiny test harness shared by the standalone C++ tests: each failed check prints one line (every
// check with RF_TEST_VERBOSE=1: its message carries the measured errors, so two builds' logs can
// be diffed), failures are counted, and main() ends with the "N passed, M failed" line.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace rf::test {

inline int g_passed = 0, g_failed = 0;

inline void check(bool ok, const std::string& what) {
  static const bool verbose = [] {
    const char* v = std::getenv("RF_TEST_VERBOSE");
    return v && std::strcmp(v, "1") == 0;
  }();
  if (ok) {
    ++g_passed;
    if (verbose) std::printf("ok %s\n", what.c_str());
  } else {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Relative L2 error ||got - want|| / ||want|| (want in double).
inline double rel_l2(const float* got, const double* want, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double(got[i]) - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}

// The L2 norm, in double.
inline double l2(const std::vector<float>& v) {
  double sq = 0;
  for (float x : v) sq += double(x) * double(x);
  return std::sqrt(sq);
}

inline double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = double(got[i]) - double(want[i]);
    num += d * d;
    den += double(want[i]) * double(want[i]);
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}

inline int finish(const char* name) {
  std::printf("%s: %d passed, %d failed\n", name, g_passed, g_failed);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace rf::test
