"""``ConsistencyLoss`` on the CUDA kernels of ``csrc/kernels/consistency.cu`` (Xie et al. 2018, sec. 3.1).

``fastkd::cuda_consistency_forward(s, t, valid, dilation) -> (loss_sum, difference)`` computes c_s - c_t
per pixel in float64 (one thread per pixel, the 8 neighbours read in place) and sums the squares per block
in a fixed order; ``fastkd::cuda_consistency_backward`` gathers dL/dl per pixel. No atomics: the result is
the same on every run.
"""

from fastkd.ops import consistency as op

op.add_kernel_backend("cuda", "fastkd::cuda_consistency_forward", "fastkd::cuda_consistency_backward")
