"""The ``cpp`` backend: CPU implementations in C++ (``csrc/cpu/``), registered as ``fastkd::cpp_*`` operators
with a CPU implementation only. They share the per-element math with the CUDA kernels
(``csrc/kernels/*_math.cuh``) and parallelise with ``at::parallel_for``; results do not depend on the number
of threads.

One module per op adds the Python side: fake implementations (for ``torch.compile``), autograd, and the
op's ``IMPLEMENTATIONS["cpp"]`` entry. ``fastkd`` imports them when the extension is loaded.
"""

from fastkd import _extension

if _extension.LOAD_ERROR is None:  # importing a kernel module registers its backend
    from fastkd.cpp_kernels import affinity_window, consistency  # noqa: F401
