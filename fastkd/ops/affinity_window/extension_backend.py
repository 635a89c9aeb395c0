"""The ``cuda`` and ``cpp`` backends of the ``affinity_window`` op: ``fastkd._C``'s compiled ops
(``csrc/affinity_window/``).

``fastkd::affinity_window_forward`` / ``_backward`` have the CUDA kernels (``affinity_window.cu``: nodes
pooled on the fly, one thread per node forward, one per node and channel for dL/df_hat backward) on the CUDA
key and the C++ implementation (``affinity_window_cpu.cpp``: the kernels' per-node math with
``at::parallel_for``, partial sums per fixed block of nodes added in block order) on the CPU key: the
dispatcher picks by device. ``fastkd_emulated::...`` runs the CUDA kernel sources on CPU tensors through the
emulator. No atomics anywhere: results are bitwise the same on every run, and on CPU for any number of
threads. Imported only where ``fastkd._C`` is loaded.
"""

from fastkd.ops.affinity_window import schema

window_graph_sum = schema.register("fastkd")
emulated_window_graph_sum = schema.register("fastkd_emulated")
