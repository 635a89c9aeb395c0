"""The ``cuda`` backend: the CUDA kernels of ``fastkd._C`` (``csrc/kernels/``), registered as ``fastkd::cuda_*``
operators with a CUDA implementation (CUDA builds) and a CPU one that runs the very same kernel sources
through fastkd's CUDA emulator (``csrc/emulator/``; ``backend="cuda"`` accepts CPU tensors when
``FASTKD_EMULATE_CUDA=1``).

One module per op adds the Python side: fake implementations (for ``torch.compile``), autograd, and the
op's ``IMPLEMENTATIONS["cuda"]`` entry. ``fastkd`` imports them when the extension is loaded.
"""

from fastkd import _extension

if _extension.LOAD_ERROR is None:  # importing a kernel module registers its backend
    from fastkd.cuda_kernels import affinity_full, affinity_window, consistency  # noqa: F401
