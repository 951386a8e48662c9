// CPU feature detection (cpuid + xgetbv) and the run-time choice of kernel ISA.
#include "core/cpu.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace rf {

namespace {

#if defined(__x86_64__) || defined(__i386__)
struct CpuidRegs {
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidRegs cpuid_query(uint32_t leaf, uint32_t subleaf) {
  CpuidRegs r;
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
  return r;
}

// XCR0: which register states the OS saves on context switch. Inline asm so this
// file needs no -mxsave.
uint64_t xcr0_read() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool bit(uint32_t reg, int b) { return (reg >> b) & 1u; }

CpuFeatures features_detect() {
  CpuFeatures f;
  uint32_t max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 1) return f;
  CpuidRegs l1 = cpuid_query(1, 0);
  bool osxsave = bit(l1.ecx, 27), avx = bit(l1.ecx, 28);
  if (!osxsave || !avx) return f;
  uint64_t xcr0 = xcr0_read();
  // Bits 1,2: XMM and YMM state; bits 5,6,7: opmask, ZMM0-15 upper halves, ZMM16-31.
  bool os_ymm = (xcr0 & 0x6) == 0x6;
  bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0;
  if (!os_ymm) return f;
  f.fma = bit(l1.ecx, 12);
  f.f16c = bit(l1.ecx, 29);
  if (max_leaf < 7) return f;
  CpuidRegs l7 = cpuid_query(7, 0);
  f.avx2 = bit(l7.ebx, 5);
  if (os_zmm) {
    f.avx512f = bit(l7.ebx, 16);
    f.avx512dq = bit(l7.ebx, 17);
    f.avx512bw = bit(l7.ebx, 30);
    f.avx512vl = bit(l7.ebx, 31);
    if (l7.eax >= 1) f.avx512bf16 = bit(cpuid_query(7, 1).eax, 5);
  }
  return f;
}
#else
CpuFeatures features_detect() { return CpuFeatures{}; }
#endif

bool avx512_usable(const CpuFeatures& f) {
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512bf16;
}

Isa isa_choose() {
  const CpuFeatures& f = cpu_features();
  if (!(f.avx2 && f.fma && f.f16c))
    throw std::runtime_error(
        "redflag: this CPU (or OS) lacks AVX2, FMA or F16C, which the CPU kernels require");
  const char* env = std::getenv("REDFLAG_ISA");
  std::string want = env ? env : "";
  if (want.empty() || want == "auto") return avx512_usable(f) ? Isa::avx512 : Isa::avx2;
  if (want == "avx2") return Isa::avx2;
  if (want == "avx512") {
    if (!avx512_usable(f))
      throw std::runtime_error(
          "redflag: REDFLAG_ISA=avx512 requested, but this CPU (or OS) lacks AVX-512 F/BW/VL/DQ "
          "with BF16");
    return Isa::avx512;
  }
  throw std::runtime_error("redflag: unknown REDFLAG_ISA value '" + want +
                           "' (expected avx2, avx512 or auto)");
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = features_detect();
  return features;
}

Isa active_isa() {
  // Decided once per process (REDFLAG_ISA is read once); if the choice throws, the
  // static stays uninitialised and every later call throws the same error again.
  static const Isa isa = isa_choose();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

}  // namespace rf
