// The FP64 tensor-core product of one warp: mma.sync.aligned.m8n8k4.row.col.f64 (sm_80 and newer; DMMA in
// SASS), and the emulator's counterpart with the same fragments when the kernels run on the CPU.
//
//   mma_m8n8k4(d, a, b)   d += A B for the 8 x 4 matrix A and the 4 x 8 matrix B held by the 32 lanes of the
//                         warp: a = A[lane / 4][lane % 4], b = B[lane % 4][lane / 4]; d[i] = D[lane / 4][2 (lane %
//                         4) + i], i = 0, 1. Every lane of the warp must call it together (no divergence, no
//                         exited lane), as the PTX requires; the emulator reports any that does not.
#pragma once

#include "fastkd_cuda.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastkd's CUDA kernels use FP64 mma.sync, which needs sm_80 or newer (set TORCH_CUDA_ARCH_LIST to 8.0 or above)"
#endif

namespace fastkd {

FASTKD_DEVICE inline void mma_m8n8k4(double (&d)[2], double a, double b) {
#if defined(__CUDACC__)
  asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};"
      : "+d"(d[0]), "+d"(d[1])
      : "d"(a), "d"(b));
#else
  emu::warp_mma_m8n8k4_f64(a, b, d);
#endif
}

}  // namespace fastkd
