"""Literal definitions of holistic distillation (FORMULAS.md section 7; Liu et al., eqs. 3-4): the
discriminator is called on one sample at a time, and each sample's gradient penalty is its own
``torch.autograd.grad`` call. Run ``D`` in eval mode (BatchNorm on running statistics, no power iteration)
and in float64 to compare with the batched implementation."""

from __future__ import annotations

import torch


def _score(D, seg, image, i) -> torch.Tensor:
    """D's score of sample i alone, a 0-dim tensor."""
    sample = seg[i:i + 1]
    return (D(sample) if image is None else D(sample, image[i:i + 1]))[0]


def self_attention(module, x) -> torch.Tensor:
    """SAGAN self-attention with the weights of ``module`` (a fastkd.holistic.SelfAttention), one output
    position at a time: ``o_i = sum_j softmax_j(q_i . k_j) v_j``, output ``gamma * o + x``."""
    batch, channels, height, width = x.shape
    q, k, v = module.query(x).flatten(2), module.key(x).flatten(2), module.value(x).flatten(2)
    out = torch.zeros_like(x).flatten(2)
    for b in range(batch):
        for i in range(height * width):
            weights = torch.softmax(torch.stack([q[b, :, i] @ k[b, :, j] for j in range(height * width)]), 0)
            out[b, :, i] = sum(weights[j] * v[b, :, j] for j in range(height * width))
    return module.gamma * out.view_as(x) + x


def gradient_penalty(D, fake, real, u, image=None) -> torch.Tensor:
    """``mean_i (||grad_x D(x_i)||_2 - 1)^2``, ``x_i = u_i real_i + (1 - u_i) fake_i``, ``u`` of shape (B,).

    One ``torch.autograd.grad`` per sample, differentiable (create_graph=True) w.r.t. D's parameters.
    """
    terms = []
    for i in range(fake.shape[0]):
        x = (u[i] * real[i:i + 1].detach() + (1 - u[i]) * fake[i:i + 1].detach()).requires_grad_(True)
        score = D(x) if image is None else D(x, image[i:i + 1])
        (grad,) = torch.autograd.grad(score.sum(), x, create_graph=True)
        terms.append((torch.sqrt((grad**2).sum()) - 1) ** 2)
    return sum(terms) / len(terms) if terms else fake.new_zeros(())


def holistic_d_loss(D, fake, real, u, image=None, gp_weight=10.0) -> torch.Tensor:
    """``mean_i D(fake_i) - mean_i D(real_i) + gp_weight * gradient_penalty(D, fake, real, u, image)``."""
    batch = fake.shape[0]
    if batch == 0:
        return fake.new_zeros(())
    fake = fake.detach()
    fake_mean = sum(_score(D, fake, image, i) for i in range(batch)) / batch
    real_mean = sum(_score(D, real, image, i) for i in range(batch)) / batch
    return fake_mean - real_mean + gp_weight * gradient_penalty(D, fake, real, u, image)


def holistic_g_loss(D, fake, image=None) -> torch.Tensor:
    """``-mean_i D(fake_i)``, one sample at a time."""
    batch = fake.shape[0]
    if batch == 0:
        return fake.new_zeros(())
    return -sum(_score(D, fake, image, i) for i in range(batch)) / batch
