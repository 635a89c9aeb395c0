// The CUDA consistency kernels compiled as C++ for the emulator (namespace fastkd::emulated).
#define FASTKD_EMULATE_CUDA 1
#include "../kernels/consistency.cu"
