"""``PairwiseAffinityLoss(window=None)`` and ``AffinityDistillationLoss`` on the CUDA kernels of
``csrc/kernels/affinity_full.cu`` (the algorithms of :mod:`fastkd.triton_kernels.affinity`, whose docstring
has the math).

``fastkd::cuda_affinity_forward(s, t, kernel_h, kernel_w, grid_h, grid_w, max_pool, eps, use_gram, per_row,
detach_norm) -> (terms, ||s_i||, ||t_i||, SS', ST', TT')`` computes ``r_i = sum_j D_ij^2`` (D = S'S - T'T of
the pooled, normalised nodes) per row with ``per_row``, else its per-image sum, by the Gram identity (C x C
matrices from tiled kernels, O(m C^2)) or directly (tiles of D formed in shared memory, O(m^2 C)); the Gram
matrices are empty on the direct path. ``fastkd::cuda_affinity_backward`` returns (dL/ds, dL/dt). Everything
is accumulated in float64, without atomics: the result is the same on every run.
"""

from __future__ import annotations

import functools

import torch

from fastkd.cuda_kernels.affinity_window import window_graph_sum
from fastkd.ops import affinity_kernels

affinity_forward = torch.ops.fastkd.cuda_affinity_forward.default
affinity_backward = torch.ops.fastkd.cuda_affinity_backward.default
full_graph_terms = functools.partial(affinity_kernels.full_graph_terms, affinity_forward)

affinity_kernels.add_backend("cuda", affinity_forward, affinity_backward, window_graph_sum)
