"""Holistic distillation (Liu et al., 2020, "Structured Knowledge Distillation for Dense Prediction",
eqs. 3-4).

A conditional Wasserstein GAN: the student's segmentation map is the fake sample, the teacher's the real
one, and :class:`HolisticDiscriminator` scores a map (optionally concatenated with the image) as a whole.
The discriminator is trained with :func:`holistic_d_loss` (WGAN-GP), the student with
:func:`holistic_g_loss`. FORMULAS.md section 7 is the contract.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fastkd._validation import check_nonnegative_float, check_float_tensor, check_int, check_student_teacher
from fastkd.ops._common import mean_or_zero


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al., 2018), as used by Liu et al.'s discriminator.

    On x (B, C, H, W) with N = H*W positions: ``q = W_q x``, ``k = W_k x`` (1x1 convs to
    ``max(C // 8, 1)`` channels), ``v = W_v x`` (1x1 conv to C channels);
    ``a[i, :] = softmax_j(q_i . k_j)``; ``o_i = sum_j a[i, j] v_j``; the output is ``gamma * o + x`` with
    ``gamma`` a learned scalar initialised to 0, so the block starts as the identity. The 1x1 convs are not
    spectral-normalised (as in the authors' code).
    """

    def __init__(self, channels: int):
        super().__init__()
        channels = check_int(channels, "channels", "SelfAttention", 1)
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        q = self.query(x).flatten(2)  # (B, C', N)
        k = self.key(x).flatten(2)  # (B, C', N)
        v = self.value(x).flatten(2)  # (B, C, N)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N); row i sums to 1 over j
        out = v @ attention.transpose(1, 2)  # out[:, :, i] = sum_j attention[i, j] v[:, :, j]
        return self.gamma * out.view_as(x) + x


class HolisticDiscriminator(nn.Module):
    """The embedding network D of holistic distillation (Liu et al., sec. 2.1, eq. 3); score shape (B,).

    Layers, on the input ``cat(seg, image)`` with ``num_classes + image_channels`` channels:

    1. BatchNorm2d on the input (normalises the scale difference between the map and the image);
    2. ``blocks`` blocks k = 0..blocks-1: a spectral-normalised 4x4 convolution, stride 2, padding 1, to
       ``base_channels * 2**k`` channels, then LeakyReLU(0.1); a :class:`SelfAttention` follows each of the
       last ``attention`` blocks;
    3. a spectral-normalised 4x4 convolution to one channel, stride 1, padding 2 (so that even a 1x1 map
       from the last block gives a 2x2 output);
    4. the mean over positions: the score of each sample.

    Each block halves the size (rounding down), so H and W must be at least ``2**blocks``.
    ``image_channels=0`` scores the map alone, as the authors' code does.

    Paper vs contract: the paper describes blocks with BN and ReLU ("A2L4": four blocks, two attention
    layers); the contract follows the authors' code, which uses spectral normalisation and LeakyReLU(0.1)
    in the blocks and BN only on the input.
    """

    def __init__(
        self,
        num_classes: int,
        image_channels: int = 3,
        base_channels: int = 64,
        blocks: int = 4,
        attention: int = 2,
    ):
        super().__init__()
        where = "HolisticDiscriminator"
        self.num_classes = check_int(num_classes, "num_classes", where, 1)
        self.image_channels = check_int(image_channels, "image_channels", where, 0)
        self.base_channels = check_int(base_channels, "base_channels", where, 1)
        self.blocks = check_int(blocks, "blocks", where, 1)
        self.attention = check_int(attention, "attention", where, 0)
        if self.attention > self.blocks:
            raise ValueError(
                f"{where}: `attention` must be <= `blocks` ({self.blocks}), got {self.attention}"
            )
        channels = self.num_classes + self.image_channels
        self.input_norm = nn.BatchNorm2d(channels)
        layers = []
        for k in range(self.blocks):
            width = self.base_channels * 2**k
            layers += [spectral_norm(nn.Conv2d(channels, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]
            if k >= self.blocks - self.attention:
                layers.append(SelfAttention(width))
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Conv2d(channels, 1, 4, stride=1, padding=2))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, image_channels={self.image_channels}, "
            f"base_channels={self.base_channels}, blocks={self.blocks}, attention={self.attention}"
        )

    def forward(self, seg: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores (B,) of ``seg`` (B, num_classes, H, W), conditioned on ``image`` (B, image_channels, H, W).

        ``image`` must be given if and only if ``image_channels > 0``.
        """
        where = "HolisticDiscriminator"
        check_float_tensor(seg, "seg", where, 4, "(B, num_classes, H, W)")
        if seg.shape[1] != self.num_classes:
            raise ValueError(
                f"{where}: `seg` must have num_classes={self.num_classes} channels, "
                f"got shape {tuple(seg.shape)}"
            )
        if self.image_channels == 0:
            if image is not None:
                raise ValueError(f"{where}: built with image_channels=0, so `image` must be None")
            x = seg
        else:
            if image is None:
                raise ValueError(
                    f"{where}: `image` is required (built with image_channels={self.image_channels}; "
                    f"use image_channels=0 to score the map alone)"
                )
            check_student_teacher(seg, image, where, s_name="seg", t_name="image")
            if image.shape[1] != self.image_channels:
                raise ValueError(
                    f"{where}: `image` must have image_channels={self.image_channels} channels, "
                    f"got shape {tuple(image.shape)}"
                )
            x = torch.cat([seg, image], dim=1)
        minimum = 2**self.blocks
        if seg.shape[2] < minimum or seg.shape[3] < minimum:
            raise ValueError(
                f"{where}: `seg` is {seg.shape[2]}x{seg.shape[3]} but {self.blocks} stride-2 blocks need a "
                f"map of at least {minimum}x{minimum}; upsample the map or use fewer `blocks`"
            )
        out = self.head(self.features(self.input_norm(x)))
        return out.mean(dim=(1, 2, 3))


def _scores(D: Callable, seg: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
    return D(seg) if image is None else D(seg, image)


def holistic_d_loss(
    D: Callable,
    fake: torch.Tensor,
    real: torch.Tensor,
    image: Optional[torch.Tensor] = None,
    gp_weight: float = 10.0,
    *,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Discriminator loss of holistic distillation: WGAN-GP (Liu et al., eq. 3; Gulrajani et al., 2017).

    ``fake`` (student map) and ``real`` (teacher map): (B, C, H, W), identical shapes; ``image`` the
    condition passed to ``D`` with each of them (None for a map-only discriminator). ::

        loss = mean_i D(fake_i) - mean_i D(real_i) + gp_weight * mean_i (||grad_x D(x_i)||_2 - 1)^2
        x_i  = u_i * real_i + (1 - u_i) * fake_i,   u_i ~ U(0, 1) per sample

    ``u = torch.rand(B, generator=generator, device=fake.device, dtype=fake.dtype)``: pass a generator to
    reproduce it. The gradient norm of sample i runs over all elements of x_i (the map; the image is a
    condition, not interpolated), computed from ``D(x).sum()``; with ``D`` in training mode its input
    BatchNorm couples the samples of a batch, so the norms are per-sample exactly in eval mode.
    ``fake`` is detached, so the loss trains D only; the interpolation also uses a detached ``real``, and the
    penalty is differentiable w.r.t. D's parameters (``create_graph=True``). ``gp_weight``: finite, >= 0.
    ``D`` is called three times (fake, real, interpolates), each call a training step for its BatchNorm
    statistics and spectral-norm power iteration when D is in training mode. Returns a 0-dim tensor; 0 for
    an empty batch.

    Paper vs contract: eq. 3 is the Wasserstein term only; the paper says the Lipschitz constraint is a
    gradient penalty without writing it; the contract gives the standard WGAN-GP form above.
    """
    where = "holistic_d_loss"
    if not callable(D):
        raise TypeError(f"{where}: `D` must be a callable discriminator, got {type(D).__name__}")
    check_student_teacher(fake, real, where, s_name="fake", t_name="real", same_channels=True)
    check_nonnegative_float(gp_weight, "gp_weight", where)
    fake = fake.detach()
    wasserstein = mean_or_zero(_scores(D, fake, image)) - mean_or_zero(_scores(D, real, image))
    u = torch.rand(fake.shape[0], generator=generator, device=fake.device, dtype=fake.dtype).view(-1, 1, 1, 1)
    x = (u * real.detach() + (1 - u) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(_scores(D, x, image).sum(), x, create_graph=True)
    norms = torch.linalg.vector_norm(grad.flatten(1), ord=2, dim=1)
    return wasserstein + gp_weight * mean_or_zero((norms - 1).square())


def holistic_g_loss(D: Callable, fake: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generator (student) loss of holistic distillation: ``-mean_i D(fake_i)`` (Liu et al., eqs. 3-4).

    ``fake``: the student's map (B, C, H, W), not detached, so the gradient reaches the student; ``image``
    the condition (None for a map-only discriminator). Returns a 0-dim tensor; 0 for an empty batch.
    Eq. 4 weights it by lambda_2 = 0.1 in the student's objective.
    """
    where = "holistic_g_loss"
    if not callable(D):
        raise TypeError(f"{where}: `D` must be a callable discriminator, got {type(D).__name__}")
    check_float_tensor(fake, "fake", where, 4, "(B, C, H, W)")
    return -mean_or_zero(_scores(D, fake, image))
