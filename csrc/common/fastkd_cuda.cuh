// What the kernel sources include instead of CUDA's headers: real CUDA under nvcc, fastkd's emulator when
// compiled as C++ with FASTKD_EMULATE_CUDA (csrc/<op>/<op>_emulated.cpp), so that one source serves both.
//
//   FASTKD_GLOBAL / FASTKD_DEVICE / FASTKD_HOST_DEVICE   __global__ / __device__ / __host__ __device__
//   FASTKD_SHARED(T, name, N)                             a __shared__ T name[N] (race-checked when emulated)
//   FASTKD_LAUNCH(kernel, grid, block, stream, args...)   kernel<<<grid, block, 0, stream>>>(args...), after a
//                                                         check of grid and block (LaunchExtents, 64-bit)
//                                                         against CUDA's limits (launch_limits.h), then a
//                                                         check of the launch; both throw std::runtime_error
//                                                         naming the kernel and its configuration
//   fastkd::global_ptr<T>                                 what kernels take global memory as: T*, or the
//                                                         emulator's checked GlobalPtr<T> when emulated
//   fastkd_stream_t                                       cudaStream_t
//   FASTKD_LAUNCH_BOUNDS(threads, blocks_per_sm)          __launch_bounds__ under nvcc (registers capped for
//                                                         that many blocks an SM), nothing when emulated
//   FASTKD_UNROLL                                         #pragma unroll under nvcc (a loop over register
//                                                         arrays must unroll, or they go to local memory)
//   FASTKD_KERNELS                                        the namespace of the kernels: fastkd::cuda, or
//                                                         fastkd::emulated when emulated (both can be linked)
//   fastkd_half, fastkd_bfloat16                          the 16-bit storage types (__half, __nv_bfloat16)
//
// Host code of a CUDA build that only calls the launchers (the torch glue, compiled by the C++ compiler)
// defines FASTKD_CUDA_HOST to see the fastkd::cuda declarations.
#pragma once

#include <cstdint>

#include "launch_limits.h"

#if defined(__CUDACC__) || defined(FASTKD_CUDA_HOST)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#include <stdexcept>
#include <string>

#define FASTKD_GLOBAL __global__
#define FASTKD_DEVICE __device__
#define FASTKD_HOST_DEVICE __host__ __device__
#define FASTKD_SHARED(T, name, N) __shared__ T name[N]
#define FASTKD_UNROLL _Pragma("unroll")
#define FASTKD_LAUNCH_BOUNDS(threads, blocks_per_sm) __launch_bounds__(threads, blocks_per_sm)
#define FASTKD_LAUNCH(kernel, grid, block, stream, ...)                                                  \
  do {                                                                                                   \
    const ::fastkd::LaunchExtent fastkd_launch_grid = (grid), fastkd_launch_block = (block);             \
    ::fastkd::check_launch_limits(#kernel, fastkd_launch_grid, fastkd_launch_block);                      \
    kernel<<<::fastkd::to_dim3(fastkd_launch_grid), ::fastkd::to_dim3(fastkd_launch_block), 0, (stream)>>>( \
        __VA_ARGS__);                                                                                    \
    ::fastkd::check_launch(cudaGetLastError(), #kernel, fastkd_launch_grid, fastkd_launch_block);         \
  } while (0)

namespace fastkd {

inline dim3 to_dim3(const LaunchExtent& e) {  // within CUDA's limits: check_launch_limits came first
  return dim3(static_cast<unsigned>(e.x), static_cast<unsigned>(e.y), static_cast<unsigned>(e.z));
}

// The status of the launch just made (cudaGetLastError, which also clears it): too many resources or no
// kernel image for this GPU raises here, at the op that launched, instead of at torch's next CUDA call or not
// at all (leaving the outputs uninitialised). Errors while the kernel runs surface at the next
// synchronisation, as with C10_CUDA_KERNEL_LAUNCH_CHECK.
inline void check_launch(cudaError_t status, const char* kernel, const LaunchExtent& grid, const LaunchExtent& block) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string("fastkd: launching ") + describe_launch(kernel, grid, block) + " failed: " +
                           cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

}  // namespace fastkd
#else
#define FASTKD_HOST_DEVICE
#endif
#define FASTKD_KERNELS cuda
using fastkd_stream_t = cudaStream_t;
using fastkd_half = __half;
using fastkd_bfloat16 = __nv_bfloat16;

#elif defined(FASTKD_EMULATE_CUDA)

#include "../emulator/cuda_emulator.h"

// The profile groups a warp's accesses by the call site of the emulator's hook, so the host compiler must not
// give the lanes of one warp different copies of one source access: loop unswitching and path splitting (-O3)
// copy code on conditions that differ between lanes (a node past the last one), which the profile then counted
// as two requests of a few lanes each, with bank conflicts no GPU has. No result changes.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-unswitch-loops", "no-split-paths", "no-split-loops")
#endif

#define FASTKD_GLOBAL
#define FASTKD_DEVICE
#define FASTKD_HOST_DEVICE
#define FASTKD_UNROLL
#define FASTKD_LAUNCH_BOUNDS(threads, blocks_per_sm)
#define FASTKD_SHARED(T, name, N)     \
  static const char name##_site = 0; \
  auto& name = ::fastkd::emu::shared_array<T, N>(&name##_site, #name)
#define FASTKD_LAUNCH(kernel, grid, block, stream, ...)                                                   \
  ((void)(stream), ::fastkd::emu::launch(#kernel, (grid), (block), #__VA_ARGS__, [&] { kernel(__VA_ARGS__); }, \
                                         __VA_ARGS__))
#define FASTKD_KERNELS emulated
using fastkd_stream_t = void*;
using fastkd_half = __half;
using fastkd_bfloat16 = __nv_bfloat16;

#else
// A plain C++ compiler without the emulator: only the host-device math headers may be included this way.
#define FASTKD_HOST_DEVICE
#endif

namespace fastkd {
#if defined(FASTKD_EMULATE_CUDA) && !defined(__CUDACC__) && !defined(FASTKD_CUDA_HOST)
template <typename T>
using global_ptr = emu::GlobalPtr<T>;
#else
template <typename T>
using global_ptr = T*;
#endif
}  // namespace fastkd
