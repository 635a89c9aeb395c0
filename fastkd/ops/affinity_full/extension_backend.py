"""The ``cuda`` backend of the ``affinity_full`` op: ``fastkd._C``'s compiled ops (``csrc/affinity_full/``).

``fastkd::affinity_full_forward`` / ``_backward`` have the CUDA kernels (``affinity_full.cu``, the algorithms
of :mod:`fastkd.ops.affinity_full.triton_backend`, whose docstring has the math) on the CUDA key and no CPU
kernel; ``fastkd_emulated::...`` runs the CUDA kernel sources on CPU tensors through the emulator. Everything
is accumulated in float64, without atomics: the result is the same on every run. Imported only where
``fastkd._C`` is loaded.
"""

from fastkd.ops.affinity_full import schema

full_graph_terms = schema.register("fastkd")
emulated_full_graph_terms = schema.register("fastkd_emulated")
