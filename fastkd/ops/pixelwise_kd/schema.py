"""The schema every kernel backend of the ``pixelwise_kd`` op implements (the per-pixel shape of
:mod:`fastkd.ops._per_pixel_schema`), registered once per namespace:

    pixelwise_kd_forward(Tensor s, Tensor t, float temperature) -> Tensor terms
    pixelwise_kd_backward(Tensor grad_terms, Tensor s, Tensor t, float temperature, int wrt) -> Tensor

``terms`` is ``KL(softmax(t / T) || softmax(s / T))`` per pixel, (B, H, W) float64.
"""

from __future__ import annotations

from typing import Callable

from fastkd.ops import _per_pixel_schema


def register(namespace: str) -> Callable:
    """Returns ``pixelwise_kd_terms(s, t, temperature)`` of ``<namespace>``, differentiable in s and t."""
    return _per_pixel_schema.register(namespace, "pixelwise_kd")
