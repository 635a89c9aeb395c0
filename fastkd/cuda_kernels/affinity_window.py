"""The windowed graph of ``PairwiseAffinityLoss(window=r)`` on the CUDA kernels of
``csrc/kernels/affinity_window.cu`` (Liu et al. 2020, eq. 2; FORMULAS.md section 1).

With nodes f_i pooled from ``kernel_h x kernel_w`` patches, ``f_hat_i = f_i / (||f_i|| + eps)`` and
``a_ij = f_hat_i . f_hat_j``, :func:`window_graph_sum` computes the float64 sum
``total = sum_b sum_i sum_{j: cheb(i, j) <= r} (a_s_ij - a_t_ij)^2`` (j = i included), cheb being the
Chebyshev distance on the node grid; the caller divides by the number of terms for ``reduction="mean"``.

``fastkd::cuda_affinity_window_forward(s, t, kernel_h, kernel_w, max_pool, window, eps, detach_norm)
-> (total, difference, s_norms, t_norms)`` pools the nodes on the fly (one thread per node), computes the
node norms (B, m) and ``D = a_s - a_t`` for one half of the window (the diagonal and one offset of each
mirrored pair), (B, half, m) float64, and sums ``D^2`` per block in a fixed order. The backward op gathers
``dL/df_hat_i = 4 sign grad sum_{j in window(i)} D_ij f_hat_j`` from D (one thread per node and channel),
then takes it through the normalisation and the pooling (one thread per node). No atomics: the result is
the same on every run. Only the inputs, the node norms and D are saved for backward; ``detach_norm`` is
read by the backward only.
"""

from fastkd.ops import affinity_kernels

window_graph_sum = affinity_kernels.window_ops("fastkd::cuda_affinity_window_forward",
                                               "fastkd::cuda_affinity_window_backward")
