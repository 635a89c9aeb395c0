"""The ``cuda`` and ``cpp`` backends of the ``probability`` op: ``fastkd._C``'s compiled ops (``csrc/probability/``).

``fastkd::probability_forward`` / ``_backward`` have the CUDA kernels (``probability.cu``: one thread per pixel, its
logits read in their own dtypes channel by channel, the softmaxes in float64 registers, one pass forward and two
backward) on the CUDA key and the C++ implementation (``probability_cpu.cpp``: blocks of pixels in parallel, each
block's logits read once in their own dtype, the softmaxes in float64, one pass forward and one backward) on the
CPU key: the dispatcher picks by device. ``fastkd_emulated::...`` runs the CUDA kernel sources on CPU tensors
through the emulator. Each output is written by one thread, no atomics: results are bitwise the same on every
run, and on CPU for any number of threads. Imported only where ``fastkd._C`` is loaded.
"""

from fastkd.ops.probability import schema

probability_terms = schema.register("fastkd")
emulated_probability_terms = schema.register("fastkd_emulated")
