"""Hand-written Triton kernels: the ``triton`` backend of the memory-heavy ops.

One module per op (kernels, the ``torch.library`` custom ops that launch them, and their autograd), plus
:mod:`~fastkd.triton_kernels.nodes`, the pooled and normalised graph nodes the affinity kernels share.
Importing a kernel module adds its entry to the op's ``IMPLEMENTATIONS`` table; ``fastkd`` imports them
when Triton can be imported. ``NOTES.md`` beside this file gives each kernel's FLOP and byte counts.

Every kernel accumulates in float64, reads any dtype and any strides, uses 64-bit offsets and no atomics:
results are bitwise reproducible run to run. On CPU tensors the kernels run under the Triton interpreter,
which ``TRITON_INTERPRET=1`` selects when Triton is first imported.
"""

from __future__ import annotations

from typing import Optional

TRITON_ERROR: Optional[str]
try:
    import triton  # noqa: F401
except Exception as error:  # not installed, or installed but broken: the torch backend still works
    TRITON_ERROR = f"triton cannot be imported ({type(error).__name__}: {error}); `pip install triton`"
else:
    TRITON_ERROR = None

if TRITON_ERROR is None:  # importing a kernel module registers its backend
    from fastkd.triton_kernels import affinity, consistency  # noqa: F401,E402
