"""Conversions inside kernels, shared by the kernel modules."""

import triton
import triton.language as tl


@triton.jit
def to_element_type(value, ptr):
    """A float64 ``value`` converted to the element type of ``ptr`` for ``tl.store``.

    Narrower types go through float32: the Triton interpreter converts float64 straight to bfloat16 wrongly
    (errors of order 1 measured with triton 3.9), and float32 holds every bfloat16 and float16 value.
    """
    if ptr.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)
    return value.to(ptr.dtype.element_ty)
