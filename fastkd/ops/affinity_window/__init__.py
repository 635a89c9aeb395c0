"""The ``affinity_window`` op: the windowed graph of ``PairwiseAffinityLoss(window=r)`` (Liu et al. 2020,
eq. 2; FORMULAS.md section 1).

With nodes f_i pooled from ``kernel_h x kernel_w`` patches, ``f_hat_i = f_i / (||f_i|| + eps)`` and
``a_ij = f_hat_i . f_hat_j``, ``window_graph_sum(s, t, grid, window, eps, detach_norm)`` is the float64 sum
``sum_b sum_i sum_{j: cheb(i, j) <= r} (a_s_ij - a_t_ij)^2`` (j = i included), cheb being the Chebyshev
distance on the node grid; the loss divides it by the number of terms for ``reduction="mean"``. One module per
backend, each exposing ``window_graph_sum``:

* ``torch_backend``: one pass per offset of half the window, from two strided views of the node grid;
* ``triton_backend``: the Triton kernels, custom ops ``fastkd_triton::affinity_window_forward`` / ``_backward``;
* ``extension_backend``: ``fastkd::affinity_window_forward`` / ``_backward`` of ``fastkd._C``
  (``csrc/affinity_window/``: CUDA kernels on the CUDA key, the C++ implementation on the CPU key) and
  ``fastkd_emulated::...``;
* ``schema``: what the kernel backends' ops share: their schema, fake implementations and autograd.

The node and graph math every backend shares is :mod:`fastkd.ops._graph`; the loss built on this op and on
``affinity_full`` is :mod:`fastkd.ops.pairwise_affinity_loss`.
"""
