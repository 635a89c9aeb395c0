"""``ConsistencyLoss`` on the CPU in C++ (``csrc/cpu/consistency_cpu.cpp``; Xie et al. 2018, sec. 3.1).

``fastkd::cpp_consistency_forward(s, t, valid, dilation) -> (loss_sum, difference)`` computes c_s - c_t
per pixel in float64 with the CUDA kernels' per-pixel math (``csrc/kernels/consistency_math.cuh``), rows of
the map in parallel, and sums the per-row sums of squares in row order; ``fastkd::cpp_consistency_backward``
gathers dL/dl per pixel. Every output is written by one thread: the result is bitwise the same for any
number of threads. Besides the inputs and the gradient only the (B, H, W) float64 map is allocated.
"""

from fastkd.ops import consistency as op

op.add_kernel_backend("cpp", "fastkd::cpp_consistency_forward", "fastkd::cpp_consistency_backward")
