// The schema of the node pooling the affinity_full op's cpp backend runs (FORMULAS.md section 1, step 1), declared
// in fastkd with its C++ CPU implementation (pool_nodes_cpu.cpp) on the CPU key; the CUDA and Triton backends pool
// inside their own ops (the full graph's nodes once, ahead of its kernels; the windowed graph's on the fly). Its
// Python side (fake implementations, autograd) is
// fastkd/ops/affinity_full/extension_backend.py.
//
// nodes: (B, C, grid_h, grid_w) float64, each kernel_h x kernel_w patch (= stride, ceil mode: the last patches may
// be partial) of each channel averaged over the pixels that exist, or max-pooled; NaN where the patch holds a NaN
// or +-Inf. winners: for max pooling the pixel (y W + x) each node's gradient goes to, the first maximal pixel in
// row-major patch order (the first NaN pixel of a NaN patch, -1 for +-Inf without NaN: no pixel), int64 of the
// nodes' shape; an empty tensor for average pooling. The backward op gives dL/dx in x's dtype and layout from
// dL/dnodes: spread over the patch's pixels (average) or all of it to the winner (max).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("pool_nodes_forward(Tensor x, int kernel_h, int kernel_w, bool max_pool) -> (Tensor nodes, Tensor winners)");
  m.def("pool_nodes_backward(Tensor grad_nodes, Tensor x, Tensor winners, int kernel_h, int kernel_w, bool max_pool) "
        "-> Tensor");
}
