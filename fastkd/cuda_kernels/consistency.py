"""``ConsistencyLoss`` on the CUDA kernels of ``csrc/kernels/consistency.cu`` (Xie et al. 2018, sec. 3.1).

``fastkd::cuda_consistency_forward(s, t, valid, dilation) -> (loss_sum, difference)`` computes c_s - c_t
per pixel in float64 (one thread per pixel, the 8 neighbours read in place) and sums the squares per block
in a fixed order; ``fastkd::cuda_consistency_backward`` gathers dL/dl per pixel. No atomics: the result is
the same on every run.
"""

import functools

import torch

from fastkd.ops import consistency as op


@torch.library.register_fake("fastkd::cuda_consistency_forward")
def _(s, t, valid, dilation):
    return s.new_empty((), dtype=torch.float64), s.new_empty((s.shape[0], s.shape[2], s.shape[3]), dtype=torch.float64)


@torch.library.register_fake("fastkd::cuda_consistency_backward")
def _(grad_sum, x, difference, dilation, sign):
    return torch.empty_like(x)


op.register_kernel_autograd("fastkd::cuda_consistency_forward", torch.ops.fastkd.cuda_consistency_backward)
op.IMPLEMENTATIONS["cuda"] = functools.partial(op.kernel_loss, torch.ops.fastkd.cuda_consistency_forward)
