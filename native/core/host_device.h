// RF_HOST_DEVICE: a function compiled for the host and, under nvcc, for the device too, so that the
// CPU engine and the CUDA kernels share one definition of what must give the same bits on both.
#pragma once

#ifdef __CUDACC__
#define RF_HOST_DEVICE __host__ __device__
#else
#define RF_HOST_DEVICE
#endif
