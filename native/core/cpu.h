// CPU feature detection and the run-time choice of kernel instruction set.
#pragma once

namespace rf {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512bf16 = false;
};

const CpuFeatures& cpu_features();

enum class Isa { avx2, avx512 };

// The instruction set the kernels run with: AVX-512 (with BF16) where the CPU has it,
// else AVX2. The environment variable REDFLAG_ISA=avx2 forces the AVX2 path (tests run both).
// Throws std::runtime_error when the CPU lacks AVX2+FMA+F16C.
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace rf
