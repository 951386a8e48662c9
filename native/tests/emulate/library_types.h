// The CUDA data types for the CPU emulation (see emu.cpp): the two that cuda/gemm.cu names, with
// the values of the CUDA toolkit's library_types.h.
#pragma once
typedef enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType;
