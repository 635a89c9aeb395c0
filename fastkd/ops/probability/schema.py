"""The schema every kernel backend of the ``probability`` op implements (the per-pixel shape of
:mod:`fastkd.ops._per_pixel_schema`), registered once per namespace:

    probability_forward(Tensor s, Tensor t) -> Tensor terms
    probability_backward(Tensor grad_terms, Tensor s, Tensor t, int wrt) -> Tensor

``terms`` is ``||softmax(s) - softmax(t)||_2^2`` per pixel, (B, H, W) float64.
"""

from __future__ import annotations

from typing import Callable

from fastkd.ops import _per_pixel_schema


def register(namespace: str) -> Callable:
    """Returns ``probability_terms(s, t)`` of ``<namespace>``, differentiable in s and t."""
    return _per_pixel_schema.register(namespace, "probability")
