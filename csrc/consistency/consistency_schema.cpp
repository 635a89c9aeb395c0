// The one schema of the 8-neighbour consistency op (FORMULAS.md section 3), declared in fastkd (CUDA kernels on the
// CUDA key, consistency_cpu.cpp on the CPU key) and fastkd_emulated (consistency_emulated.cpp). Its Python side
// (fake implementations, autograd) is fastkd/ops/consistency/schema.py.
#include "../common/op_schema.h"

namespace {

constexpr const char* kForward =
    "consistency_forward(Tensor s, Tensor t, bool valid, int dilation) -> (Tensor loss_sum, Tensor difference)";
constexpr const char* kBackward =
    "consistency_backward(Tensor grad_loss, Tensor x, Tensor difference, int dilation, float sign) -> Tensor";

}  // namespace

FASTKD_OP_SCHEMAS(kForward, kBackward)
