"""The ``cuda`` and ``cpp`` backends of the ``pixelwise_kd`` op: ``fastkd._C``'s compiled ops (``csrc/pixelwise_kd/``).

``fastkd::pixelwise_kd_forward`` / ``_backward`` have the CUDA kernels (``pixelwise_kd.cu``: one thread per pixel, its
logits read in their own dtypes channel by channel, the softmaxes in float64 registers, one pass forward and two
backward) on the CUDA key and the C++ implementation (``pixelwise_kd_cpu.cpp``: blocks of pixels in parallel, each
block's logits read once in their own dtype, the softmaxes in float64, one pass forward and one backward) on the
CPU key: the dispatcher picks by device. ``fastkd_emulated::...`` runs the CUDA kernel sources on CPU tensors
through the emulator. Each output is written by one thread, no atomics: results are bitwise the same on every
run, and on CPU for any number of threads. Imported only where ``fastkd._C`` is loaded.
"""

from fastkd.ops.pixelwise_kd import schema

pixelwise_kd_terms = schema.register("fastkd")
emulated_pixelwise_kd_terms = schema.register("fastkd_emulated")
