// The one schema of the windowed pair-wise affinity op (FORMULAS.md section 1), declared in fastkd (CUDA kernels on
// the CUDA key, affinity_window_cpu.cpp on the CPU key) and fastkd_emulated (affinity_window_emulated.cpp). Its
// Python side (fake implementations, autograd) is fastkd/ops/affinity_window/schema.py.
#include "../common/op_schema.h"

namespace {

constexpr const char* kForward =
    "affinity_window_forward(Tensor s, Tensor t, int kernel_h, int kernel_w, bool max_pool, int window, float eps, "
    "bool detach_norm) -> (Tensor total, Tensor difference, Tensor teacher_affinity, Tensor s_norms, Tensor t_norms)";
constexpr const char* kBackward =
    "affinity_window_backward(Tensor grad_total, Tensor x, Tensor norms, Tensor difference, Tensor teacher_affinity, "
    "int kernel_h, int kernel_w, bool max_pool, int window, float eps, bool detach_norm, float sign) -> Tensor";

}  // namespace

FASTKD_OP_SCHEMAS(kForward, kBackward)
