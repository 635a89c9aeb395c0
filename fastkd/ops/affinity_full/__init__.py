"""The ``affinity_full`` op: every node compared with every node, the graph of ``PairwiseAffinityLoss`` (no
window, or one spanning the node grid; Liu et al. 2020, eq. 2) and of ``AffinityDistillationLoss`` (He et al.
2019, eqs. 3-4); FORMULAS.md sections 1 and 2.

With S (Cs x m) and T (Ct x m) the pooled, normalised nodes of one image and ``D = S'S - T'T`` (never stored),
``full_graph_terms(s, t, grid, eps, detach_norm, use_gram, per_row)`` gives ``r_i = sum_j D_ij^2`` per row,
(B, m) float64, with ``per_row`` (the distillation loss is ``sum_i sqrt(r_i) / m``), else ``sum_i r_i`` per
image, (B,). ``use_gram`` picks the algorithm: C x C Gram matrices (O(m C^2)) or tiles of D (O(m^2 C)). One
module per backend, each exposing ``full_graph_terms``:

* ``torch_backend``: Gram matrices or the materialised m x m difference (only where m is small next to C);
* ``triton_backend``: the Triton kernels, custom ops ``fastkd_triton::affinity_full_forward`` / ``_backward``;
* ``extension_backend``: ``fastkd::affinity_full_forward`` / ``_backward`` of ``fastkd._C``
  (``csrc/affinity_full/``: CUDA kernels on the CUDA key; there is no CPU kernel) and ``fastkd_emulated::...``;
* ``schema``: what the kernel backends' ops share: their schema, fake implementations and autograd.

The losses built on it are :mod:`fastkd.ops.pairwise_affinity_loss` and
:mod:`fastkd.ops.affinity_distillation_loss`.
"""
