// The CUDA full-graph affinity kernels compiled as C++ for the emulator (namespace fastkd::emulated).
#define FASTKD_EMULATE_CUDA 1
#include "../kernels/affinity_full.cu"
