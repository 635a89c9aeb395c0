// The shared node kernels compiled as C++ for the emulator (namespace fastkd::emulated).
#define FASTKD_EMULATE_CUDA 1
#include "nodes.cu"
