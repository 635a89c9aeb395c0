// What the torch glue headers (ops/*_glue.h) share: the kernels' storage type of a torch scalar type, the
// layout a kernel reads from a tensor, the checks of the (B, C, H, W) inputs, and the dtype dispatch of an s, t
// pair that the per-pixel ops read each in its own dtype. Included, like them, after
// the including file chose the launchers' namespace (FASTKD_EMULATE_CUDA or FASTKD_CUDA_HOST).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <initializer_list>

#include "fastkd_cuda.cuh"
#include "nodes_math.cuh"

namespace fastkd {
namespace glue {  // the same in every including file

// The layout of a (B, C, H, W) tensor (nodes::Map, also consistency::Map).
inline nodes::Map map_of(const at::Tensor& x) {
  return {x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// `name` must be a floating-point (B, C, H, W) tensor.
inline void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "`", name, "` must be (B, C, H, W), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "`", name, "` must be floating point, got ", x.scalar_type());
}

// The inputs s and t of a loss: checked alone, then one B, H and W (their channels may differ).
inline void check_pair(const at::Tensor& s, const at::Tensor& t) {
  check_input(s, "s");
  check_input(t, "t");
  TORCH_CHECK(s.size(0) == t.size(0) && s.size(2) == t.size(2) && s.size(3) == t.size(3),
              "`s` and `t` must share B, H and W");
}

// A tensor argument and its name in the op's schema.
struct Named {
  const char* name;
  const at::Tensor& tensor;
};

// Every defined tensor argument of `op` lies on one device. The dispatcher takes the CUDA implementation when
// any argument is a CUDA tensor, so a CPU tensor beside them would reach a kernel as a host pointer.
inline void check_same_device(const char* op, std::initializer_list<Named> arguments) {
  const Named* first = nullptr;
  for (const Named& argument : arguments) {
    if (!argument.tensor.defined()) continue;
    if (first == nullptr) {
      first = &argument;
      continue;
    }
    TORCH_CHECK(argument.tensor.device() == first->tensor.device(), "fastkd::", op, ": `", argument.name, "` is on ",
                argument.tensor.device(), " but `", first->name, "` is on ", first->tensor.device(),
                "; every tensor argument must be on one device");
  }
}

// The logits s and t of a per-pixel op (pixelwise_kd, probability): floating-point (B, C, H, W) tensors of one
// shape and one device.
inline void check_logits_pair(const char* op, const at::Tensor& s, const at::Tensor& t) {
  check_input(s, "s");
  check_input(t, "t");
  TORCH_CHECK(s.sizes() == t.sizes(), "fastkd::", op, ": `s` and `t` must have one shape, got ", s.sizes(), " and ",
              t.sizes());
  check_same_device(op, {{"s", s}, {"t", t}});
}

// dL/dterms of a per-pixel op's backward: (B, H, W) of s's B, H and W, on the device of s.
inline void check_grad_terms(const char* op, const at::Tensor& grad_terms, const at::Tensor& s) {
  TORCH_CHECK(grad_terms.sizes() == at::IntArrayRef({s.size(0), s.size(2), s.size(3)}), "fastkd::", op,
              ": `grad_terms` must be (B, H, W) = (", s.size(0), ", ", s.size(2), ", ", s.size(3), "), got ",
              grad_terms.sizes());
  check_same_device(op, {{"s", s}, {"grad_terms", grad_terms}});
}

}  // namespace glue

namespace {  // one copy per including file: fastkd_half and fastkd_bfloat16 are CUDA's or the emulator's

// The kernels' storage type of a torch scalar type (same bits).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<at::Half> {
  using type = fastkd_half;
};
template <>
struct Storage<at::BFloat16> {
  using type = fastkd_bfloat16;
};

template <typename scalar_t>
using storage_t = typename Storage<scalar_t>::type;

// A tensor's data as the kernels' storage type (scalar_t: its dtype, as AT_DISPATCH names it).
template <typename scalar_t>
const storage_t<scalar_t>* storage_data(const at::Tensor& x) {
  return reinterpret_cast<const storage_t<scalar_t>*>(x.const_data_ptr<scalar_t>());
}
template <typename scalar_t>
storage_t<scalar_t>* mutable_storage_data(const at::Tensor& x) {
  return reinterpret_cast<storage_t<scalar_t>*>(x.mutable_data_ptr<scalar_t>());
}

// f(s_data, t_data) with the data of s and t each as its own storage type (the per-pixel ops read mixed dtypes
// as they are).
template <typename F>
void dispatch_pair(const at::Tensor& s, const at::Tensor& t, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "per_pixel_s", [&] {
    const auto* s_data = storage_data<scalar_t>(s);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "per_pixel_t",
                                    [&] { f(s_data, storage_data<scalar_t>(t)); });
  });
}

}  // namespace
}  // namespace fastkd
