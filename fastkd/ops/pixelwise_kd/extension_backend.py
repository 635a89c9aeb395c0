"""The ``cpp`` backend of the ``pixelwise_kd`` op: ``fastkd._C``'s compiled ops (``csrc/pixelwise_kd/``).

``fastkd::pixelwise_kd_forward`` / ``_backward`` have the C++ implementation (``pixelwise_kd_cpu.cpp``) on the
CPU key: blocks of pixels in parallel, each block's logits read once in their own dtype, the softmaxes in
float64 registers, one pass forward and one backward. Imported only where ``fastkd._C`` is loaded.
"""

from fastkd.ops.pixelwise_kd import schema

pixelwise_kd_terms = schema.register("fastkd")
