// The CUDA windowed pair-wise affinity kernels compiled as C++ for the emulator (namespace fastkd::emulated).
#define FASTKD_EMULATE_CUDA 1
#include "../kernels/affinity_window.cu"
