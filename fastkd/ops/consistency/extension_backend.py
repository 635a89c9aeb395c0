"""The ``cuda`` and ``cpp`` backends of the ``consistency`` op: ``fastkd._C``'s compiled ops (``csrc/consistency/``).

``fastkd::consistency_forward`` / ``_backward`` have the CUDA kernels (``consistency.cu``: one thread per
pixel, the 8 neighbours read in place, per-block sums of squares in a fixed order) on the CUDA key and the C++
implementation (``consistency_cpu.cpp``: the kernels' per-pixel math, rows of the map in parallel, partial
sums added in row order) on the CPU key: the dispatcher picks by device. ``fastkd_emulated::...`` runs the
CUDA kernel sources on CPU tensors through the emulator. No atomics anywhere: results are bitwise the same
on every run, and on CPU for any number of threads. Imported only where ``fastkd._C`` is loaded.
"""

from fastkd.ops.consistency import schema

consistency_sum = schema.register("fastkd")
emulated_consistency_sum = schema.register("fastkd_emulated")
