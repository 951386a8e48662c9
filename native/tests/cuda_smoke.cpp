// Runs the CUDA smoke kernel where a GPU is present (the lent GPU machine); elsewhere it
// reports that no device was found and exits 0, so the build can be checked on any machine.
// Also checks that the build says it runs on that GPU (cuda::device_support), and under the CPU
// emulation, whose device can take any compute capability, the errors a GPU this build cannot
// run on gets: too old, or no code for it.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda.h"
#include "tests/check.h"

using rf::test::check;

namespace {

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

#ifdef RF_CUDA_EMULATION
// The emulated device as another GPU, and the emulated build as holding other code: what
// device_support says of each pair (want: the parts its message must have; none: it runs).
void check_support(int major, int minor, const char* archs, std::vector<std::string> want) {
  emu_set_device(major, minor);
  emu_set_architectures(archs);
  const std::string why = rf::cuda::device_support(0);
  const std::string what = std::to_string(major) + "." + std::to_string(minor) + " with " + archs + ": '" + why + "'";
  if (want.empty()) {
    check(why.empty(), "device_support " + what + " runs");
  } else {
    bool all = true;
    for (const std::string& w : want) all = all && has(why, w);
    check(all, "device_support " + what + " says why");
  }
  check(cudaGetLastError() == cudaSuccess, "device_support " + what + " leaves no error behind");
}

void check_other_devices() {
  // The emulated build's default, CMake's without a GPU: every 8.x GPU runs the 8.0 cubin, 9.0
  // its own, and a newer major the PTX of 9.0.
  for (auto [major, minor] : {std::pair{8, 0}, {8, 6}, {8, 9}, {9, 0}, {10, 0}, {12, 0}}) check_support(major, minor, "80-real,90", {});
  check_support(7, 5, "80-real,90", {"cuda:0 (emulated on the CPU, compute capability 7.5) is older", "8.0 or newer"});
  // Built for one GPU (as on a machine whose GPU is 9.0), run on another.
  check_support(8, 6, "90", {"holds GPU code for 90 (CMake's CUDA_ARCHITECTURES)", "compute capability 8.6",
                             "npm run build:cuda", "--CDCMAKE_CUDA_ARCHITECTURES=86"});
  check_support(10, 0, "90", {});                                          // PTX of 9.0
  check_support(10, 0, "90a", {"holds GPU code for 90a", "10.0"});          // an "a" build has no portable PTX
  check_support(9, 0, "90a", {});
  check_support(8, 9, "86-real", {});                                        // a cubin runs on later minors
  check_support(8, 0, "86-real", {"holds GPU code for 86-real", "=80"});    // ... not on earlier ones
  check_support(8, 6, "80-virtual", {});                                     // PTX alone
  // A driver older than the runtime (CUDA 13.1's build on a 13.0 driver) runs the cubins but
  // cannot compile the PTX: the GPUs only the PTX serves are refused, saying so.
  emu_set_versions(13010, 13000);
  for (auto [major, minor] : {std::pair{8, 0}, {8, 6}, {9, 0}}) check_support(major, minor, "80-real,90", {});
  for (auto [major, minor] : {std::pair{10, 0}, {12, 0}}) {
    const std::string cc = std::to_string(major) + std::to_string(minor);
    check_support(major, minor, "80-real,90", {"the NVIDIA driver (CUDA 13.0) cannot compile this build's PTX for cuda:0", "compute capability",
                                               "cudaErrorUnsupportedPtxVersion", "(80-real,90), only PTX from CUDA 13.1 would run there",
                                               "update the driver", "--CDCMAKE_CUDA_ARCHITECTURES=" + cc});
  }
  check_support(8, 6, "80-virtual", {"cannot compile this build's PTX", "=86"});
  emu_set_device(12, 0);
  check(rf::cuda::smoke_saxpy(1024) != 0 && cudaGetLastError() == cudaErrorUnsupportedPtxVersion,
        "a kernel whose PTX the driver cannot compile fails with cudaErrorUnsupportedPtxVersion");
  emu_set_versions(13000, 13000);
  // A kernel launched on a device the build holds no code for fails, as on a GPU.
  emu_set_device(8, 6);
  emu_set_architectures("90");
  rf::cuda::DeviceInfo info = rf::cuda::device_info(0);
  check(has(info.unsupported, "none of which runs on cuda:0"), "device_info(0) carries device_support's reason: '" + info.unsupported + "'");
  check(rf::cuda::smoke_saxpy(1024) != 0, "a kernel on a device without code for it does not run");
  check(cudaGetLastError() == cudaErrorNoKernelImageForDevice, "... and fails with cudaErrorNoKernelImageForDevice");
  // Shared memory: a 8.6 GPU opts in to 99 KiB a block, a 9.0 one to 227 KiB.
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  check(optin == 99 * 1024, "an 8.6 device opts in to 99 KiB of shared memory (" + std::to_string(optin) + ")");
  emu_set_device(9, 0);
  emu_set_architectures("80-real,90");
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  check(optin == 227 * 1024, "a 9.0 device opts in to 227 KiB (" + std::to_string(optin) + ")");
  info = rf::cuda::device_info(3);
  check(info.count == 1 && info.name.empty() && info.unsupported.empty(), "device_info past the last device names none");
}
#endif

}  // namespace

int main() {
  const rf::cuda::DeviceInfo info = rf::cuda::device_info();
  if (info.count == 0) {
    std::printf("cuda_smoke: no CUDA device visible; skipped\n");
    return 0;
  }
  std::printf("cuda_smoke: %d device(s); device 0: %s, sm_%d%d, %.1f GiB; built for %s\n", info.count, info.name.c_str(),
              info.sm_major, info.sm_minor, info.memory_gib, rf::cuda::built_architectures());
  check(info.unsupported.empty(), "this build runs on device 0: '" + info.unsupported + "'");
  check(std::string(rf::cuda::built_architectures()).find_first_of("0123456789") == 0, "the build's architectures are recorded");
  const double err = rf::cuda::smoke_saxpy(1 << 20);
  std::printf("cuda_smoke: saxpy max error %g\n", err);
  check(err >= 0 && err < 1e-5, "saxpy on device 0 (max error " + std::to_string(err) + ")");
#ifdef RF_CUDA_EMULATION
  check_other_devices();
#endif
  return rf::test::finish("cuda_smoke");
}
