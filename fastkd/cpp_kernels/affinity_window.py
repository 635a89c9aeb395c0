"""The windowed graph of ``PairwiseAffinityLoss(window=r)`` on the CPU in C++ (``csrc/cpu/affinity_window_cpu.cpp``;
Liu et al. 2020, eq. 2; FORMULAS.md section 1).

With nodes f_i pooled from ``kernel_h x kernel_w`` patches, ``f_hat_i = f_i / (||f_i|| + eps)`` and
``a_ij = f_hat_i . f_hat_j``, :func:`window_graph_sum` computes the float64 sum
``total = sum_b sum_i sum_{j: cheb(i, j) <= r} (a_s_ij - a_t_ij)^2`` (j = i included), cheb being the
Chebyshev distance on the node grid; the caller divides by the number of terms for ``reduction="mean"``.

``fastkd::cpp_affinity_window_forward(s, t, kernel_h, kernel_w, max_pool, window, eps, detach_norm)
-> (total, difference, s_norms, t_norms)`` runs the CUDA kernels' per-node math
(``csrc/kernels/nodes_math.cuh``, ``csrc/kernels/affinity_window_math.cuh``) with ``at::parallel_for``: the
node norms (B, m), then ``D = a_s - a_t`` for one half of the window (the diagonal and one offset of each
mirrored pair), (B, half, m) float64, with the sums of ``D^2`` per fixed block of nodes added in block order.
``fastkd::cpp_affinity_window_backward`` gathers ``dL/df_hat_i = 4 sign grad sum_{j in window(i)} D_ij f_hat_j``
per (node, channel) into a (B, C, m) float64 workspace, then takes it through the normalisation and the
pooling per node. No atomics, every output written by one thread: the result is bitwise the same for any
number of threads. Only the inputs, the node norms and D are saved for backward; ``detach_norm`` is read by
the backward only.
"""

from fastkd.ops import affinity_kernels
from fastkd.ops import pairwise_affinity as pairwise_op
from fastkd.ops.nodes import node_grid

window_graph_sum = affinity_kernels.window_ops("fastkd::cpp_affinity_window_forward",
                                               "fastkd::cpp_affinity_window_backward")


def _pairwise_affinity(s, t, config):
    """The windowed graph in C++; the full graph has no C++ implementation yet and takes the torch one."""
    grid = node_grid(s.shape[2], s.shape[3], config.patch, config.pool, config.pool_scale)
    if pairwise_op.covers_full_graph(config.window, grid.grid_h, grid.grid_w):
        return pairwise_op.IMPLEMENTATIONS["torch"](s, t, config)
    return pairwise_op.reduce_total(window_graph_sum(s, t, config), config, s.shape[0], grid.grid_h, grid.grid_w)


# Not for auto: on a 2-core CPU (benchmarks/run.py, window=2, C=64) it took 1.9-2.1x the torch backend's
# time up to 64x128 node grids and 0.68x only from 256x512 on; backend="cpp" asks for it by name.
_pairwise_affinity.auto = False
pairwise_op.IMPLEMENTATIONS["cpp"] = _pairwise_affinity
