"""The ``cpp`` backend of the ``probability`` op: ``fastkd._C``'s compiled ops (``csrc/probability/``).

``fastkd::probability_forward`` / ``_backward`` have the C++ implementation (``probability_cpu.cpp``) on the
CPU key: blocks of pixels in parallel, each block's logits read once in their own dtype, the softmaxes in
float64 registers, one pass forward and one backward. Imported only where ``fastkd._C`` is loaded.
"""

from fastkd.ops.probability import schema

probability_terms = schema.register("fastkd")
