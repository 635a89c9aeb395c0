// The one schema of the full-graph affinity op (FORMULAS.md sections 1 and 2), declared in fastkd (CUDA kernels on
// the CUDA key, no CPU kernel) and fastkd_emulated (affinity_full_emulated.cpp). Its Python side (fake
// implementations, autograd) is fastkd/ops/affinity_full/schema.py.
#include "../common/op_schema.h"

namespace {

constexpr const char* kForward =
    "affinity_full_forward(Tensor s, Tensor t, int kernel_h, int kernel_w, int grid_h, int grid_w, bool max_pool, "
    "float eps, bool use_gram, bool per_row, bool detach_norm) -> (Tensor terms, Tensor s_norm, Tensor t_norm, "
    "Tensor gram_ss, Tensor gram_st, Tensor gram_tt)";
constexpr const char* kBackward =
    "affinity_full_backward(Tensor grad_terms, Tensor s, Tensor t, Tensor s_norm, Tensor t_norm, Tensor gram_ss, "
    "Tensor gram_st, Tensor gram_tt, int kernel_h, int kernel_w, int grid_h, int grid_w, bool max_pool, float eps, "
    "bool use_gram, bool detach_norm, bool need_s, bool need_t) -> (Tensor grad_s, Tensor grad_t)";

}  // namespace

FASTKD_OP_SCHEMAS(kForward, kBackward)
