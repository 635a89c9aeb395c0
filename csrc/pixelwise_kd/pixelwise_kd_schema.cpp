// The one schema of the per-pixel KD op (FORMULAS.md section 5), declared in fastkd (the C++ CPU implementation
// pixelwise_kd_cpu.cpp on the CPU key) and fastkd_emulated. Its Python side (fake implementations, autograd) is
// fastkd/ops/pixelwise_kd/schema.py.
//
// terms: (B, H, W) float64, KL(softmax(t / T) || softmax(s / T)) per pixel over the C channels, NaN where a
// logit of the pixel is not finite. The backward op gives dL/ds (wrt 0) or dL/dt (wrt 1) in that input's dtype
// and layout from dL/dterms, recomputing the softmaxes (nothing but the inputs is saved); it is exactly 0 at
// pixels whose dL/dterms is 0 (uncounted pixels), whatever their logits.
#include "../common/op_schema.h"

namespace {

constexpr const char* kForward = "pixelwise_kd_forward(Tensor s, Tensor t, float temperature) -> Tensor";
constexpr const char* kBackward =
    "pixelwise_kd_backward(Tensor grad_terms, Tensor s, Tensor t, float temperature, int wrt) -> Tensor";

}  // namespace

FASTKD_OP_SCHEMAS(kForward, kBackward)
