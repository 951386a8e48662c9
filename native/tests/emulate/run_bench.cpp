// native/bench/cuda_bench.cu under the CPU emulation, run with --tiny by scripts/cuda-emulate.sh (its
// main is the benchmark's; check_bench.py reads the JSON it prints). This file adds the device.
#include "cuda/cuda.h"
// Under the emulation there is one device.
rf::cuda::DeviceInfo rf::cuda::device_info() {
  rf::cuda::DeviceInfo i;
  i.count = 1;
  i.name = "emulated";
  return i;
}
