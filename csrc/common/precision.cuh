// Conversions between the storage types the kernels read and write and the double they compute in.
// float and double convert directly; the 16-bit types go through float (exact in that direction).
#pragma once

#include "fastkd_cuda.cuh"

namespace fastkd {

FASTKD_HOST_DEVICE inline double to_double(double value) { return value; }
FASTKD_HOST_DEVICE inline double to_double(float value) { return value; }
#if defined(__CUDACC__) || defined(FASTKD_EMULATE_CUDA)
// torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__: use the intrinsics, not implicit conversions.
FASTKD_HOST_DEVICE inline double to_double(__half value) { return __half2float(value); }
FASTKD_HOST_DEVICE inline double to_double(__nv_bfloat16 value) { return __bfloat162float(value); }
#endif
template <typename T>  // c10::Half and c10::BFloat16 in the CPU implementations
FASTKD_HOST_DEVICE inline double to_double(T value) {
  return static_cast<float>(value);
}
#if defined(FASTKD_EMULATE_CUDA)
// An element of writable global memory under the emulator: its own type's conversion, not the one above
// (which would round a double through float).
template <typename T>
inline double to_double(const emu::GlobalRef<T>& element) {
  return to_double(static_cast<T>(element));
}
#endif

template <typename T>
FASTKD_HOST_DEVICE inline T from_double(double value) {  // c10::Half, c10::BFloat16, float
  return static_cast<T>(static_cast<float>(value));
}
template <>
FASTKD_HOST_DEVICE inline double from_double<double>(double value) {
  return value;
}
#if defined(__CUDACC__) || defined(FASTKD_EMULATE_CUDA)
template <>
FASTKD_HOST_DEVICE inline __half from_double<__half>(double value) {
  return __float2half_rn(static_cast<float>(value));
}
template <>
FASTKD_HOST_DEVICE inline __nv_bfloat16 from_double<__nv_bfloat16>(double value) {
  return __float2bfloat16_rn(static_cast<float>(value));
}
#endif

}  // namespace fastkd
