"""Literal float64 definitions of knowledge adaptation (FORMULAS.md section 6; He et al., eqs. 1-2):
an explicit loop over samples and positions, norms written out as sums of powers."""

from __future__ import annotations

import math

import torch


def _norm(v: torch.Tensor, order: float) -> torch.Tensor:
    """The ``order``-norm of a vector: ``(sum |v_c|^order)^(1/order)``, or ``max |v_c|`` for order = inf."""
    if order == math.inf:
        return v.abs().max()
    return (v.abs() ** order).sum() ** (1.0 / order)


def adaptation_loss(adapted_s, encoded_t, p=1, q=2, eps=1e-8, *, channel_invariant=False) -> torch.Tensor:
    """``1/(B*H*W) * sum_{b, j} || s_j / (||s_j||_q + eps) - t_j / (||t_j||_q + eps) ||_p``;
    0 if there are no positions. ``channel_invariant=True`` divides it by ``C^(1/p - 1/q)`` where
    ``1/p > 1/q``."""
    s = adapted_s.to(torch.float64)
    t = encoded_t.to(torch.float64)
    batch, channels, height, width = s.shape
    scale = channels ** (1.0 / p - 1.0 / q) if channel_invariant and 1.0 / p > 1.0 / q else 1.0
    total = s.new_zeros(())
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                u, v = s[b, :, y, x], t[b, :, y, x]
                total = total + _norm(u / (_norm(u, q) + eps) - v / (_norm(v, q) + eps), p)
    return total / max(batch * height * width, 1) / scale


def autoencoder_loss(phi_t, encoder, decoder, l1_weight=1e-7) -> torch.Tensor:
    """``mean((phi_t - D(E(phi_t)))^2) + l1_weight * mean(|E(phi_t)|)`` as sums over elements / counts.

    ``encoder(x)`` is E and ``decoder(z, output_size)`` is D, e.g. ``ae.encode`` and ``ae.decode`` of a
    :class:`fastkd.adaptation.FeatureAutoencoder` (make it float64 for a float64 result).
    """
    z = encoder(phi_t)
    reconstruction = decoder(z, tuple(phi_t.shape[2:]))
    squared = ((phi_t.to(torch.float64) - reconstruction.to(torch.float64)) ** 2).sum()
    l1 = z.to(torch.float64).abs().sum()
    return squared / max(phi_t.numel(), 1) + l1_weight * l1 / max(z.numel(), 1)
