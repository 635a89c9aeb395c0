"""Knowledge adaptation (He et al., 2019, "Knowledge Adaptation for Efficient Semantic Segmentation",
eqs. 1-2).

The teacher's last features ``phi_t`` are compressed by an autoencoder trained beforehand
(:class:`FeatureAutoencoder`, eq. 1); the student's features pass through an adapter
(:class:`FeatureAdapter`, the paper's ``C_f``) and are matched to the teacher's code ``E(phi_t)`` after
normalising every position's channel vector (:class:`AdaptationLoss`, eq. 2). FORMULAS.md section 6 is the
contract.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from fastkd._validation import (
    check_bool,
    check_nonnegative_float,
    is_real,
    check_float_tensor,
    check_int,
    check_positive_float,
    check_student_teacher,
)
from fastkd.ops._common import COMPUTE_DTYPE, mean_or_zero, result_dtype


def _conv_output_size(size: int, stride: int) -> int:
    """Spatial size after a 3x3 convolution with padding 1 and ``stride``."""
    return (size - 1) // stride + 1


def _check_norm_order(value, name: str, where: str) -> float:
    """A norm order: a real number >= 1, or ``float('inf')``."""
    if not is_real(value):
        raise TypeError(f"{where}: `{name}` must be a real number >= 1 or float('inf'), got {value!r}")
    if not value >= 1:  # also refuses NaN
        raise ValueError(f"{where}: `{name}` must be >= 1 or float('inf') (a norm order), got {value}")
    return float(value)


class FeatureAutoencoder(nn.Module):
    """The autoencoder that translates the teacher's features into a compact code (He et al., eq. 1).

    Encoder ``E``: three 3x3 convolutions (padding 1) with strides ``strides``, channels
    ``in_channels -> latent_channels -> latent_channels -> latent_channels``, each followed by BatchNorm and
    ReLU, the last one included: the code is non-negative like the output of :class:`FeatureAdapter` (which
    ends in ReLU), so the adapted student features can reach it. (A signed code against a non-negative
    adapter output leaves :class:`AdaptationLoss` a floor it cannot go below; measured with the reference
    trainer, it made the student collapse to one class.) Decoder ``D``: the mirror image, three 3x3 transposed
    convolutions with strides ``strides[2], strides[1], strides[0]`` back to ``in_channels``, BatchNorm +
    ReLU between them. The decoder restores the exact input size, odd sizes included.

    Shapes: ``x`` (B, in_channels, H, W) -> code (B, latent_channels, h, w) -> reconstruction
    (B, in_channels, H, W), where h is H after ``n -> (n - 1) // s + 1`` for each stride s in turn
    (likewise w).

    Paper vs contract: the paper writes eq. 1 with sums (squared Euclidean norm, l1 norm) and regularises
    the weights with l1 as well; the contract (and :meth:`loss`) uses means and leaves weight regularisation
    to the optimiser (the paper trains with weight decay 1e-4). The paper only says "three strided
    convolution layers and symmetrical deconvolution layers": the BN + ReLU after each layer are the
    contract's choice, the widths (every hidden layer at ``latent_channels``) fastkd's.
    """

    def __init__(self, in_channels: int, latent_channels: int, strides: Sequence[int] = (1, 1, 2)):
        super().__init__()
        where = "FeatureAutoencoder"
        self.in_channels = check_int(in_channels, "in_channels", where, 1)
        self.latent_channels = check_int(latent_channels, "latent_channels", where, 1)
        if isinstance(strides, str) or not isinstance(strides, Sequence) or len(strides) != 3:
            raise TypeError(f"{where}: `strides` must be a sequence of three ints, got {strides!r}")
        self.strides: Tuple[int, int, int] = tuple(
            check_int(s, f"strides[{i}]", where, 1) for i, s in enumerate(strides)
        )
        widths = (self.in_channels, self.latent_channels, self.latent_channels, self.latent_channels)
        encoder = []
        for i, stride in enumerate(self.strides):
            encoder += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1),
                        nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder)
        # The decoder is not an nn.Sequential: each transposed convolution needs its own output size.
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 3, stride=self.strides[i], padding=1)
            for i in reversed(range(3))
        )
        self.decoder_activations = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(widths[i]), nn.ReLU()) for i in (2, 1)
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, latent_channels={self.latent_channels}, "
            f"strides={self.strides}"
        )

    def _check_features(self, x, name: str, where: str, channels: int) -> None:
        check_float_tensor(x, name, where, 4, "(B, C, H, W)")
        if x.shape[1] != channels:
            raise ValueError(f"{where}: `{name}` must have {channels} channels, got shape {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x)``: (B, in_channels, H, W) -> (B, latent_channels, h, w)."""
        self._check_features(x, "x", "FeatureAutoencoder.encode", self.in_channels)
        return self.encoder(x)

    def decode(self, z: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        """``D(z)``: (B, latent_channels, h, w) -> (B, in_channels, *output_size).

        ``output_size`` = (H, W), the size of the features that were encoded; a code has several possible
        output sizes when a stride is > 1, so it must be given.
        """
        where = "FeatureAutoencoder.decode"
        self._check_features(z, "z", where, self.latent_channels)
        if isinstance(output_size, str) or not isinstance(output_size, Sequence) or len(output_size) != 2:
            raise TypeError(f"{where}: `output_size` must be a pair of ints (H, W), got {output_size!r}")
        sizes = [tuple(check_int(n, f"output_size[{i}]", where, 1) for i, n in enumerate(output_size))]
        for stride in self.strides:
            sizes.append(tuple(_conv_output_size(n, stride) for n in sizes[-1]))
        if tuple(z.shape[2:]) != sizes[3]:
            raise ValueError(
                f"{where}: `z` is {z.shape[2]}x{z.shape[3]} but encoding a map of `output_size` "
                f"{sizes[0][0]}x{sizes[0][1]} gives {sizes[3][0]}x{sizes[3][1]}"
            )
        for i, deconv in enumerate(self.deconvs):
            if i:
                z = self.decoder_activations[i - 1](z)
            z = deconv(z, output_size=sizes[2 - i])
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``D(E(x))``, the same shape as ``x``."""
        return self.decode(self.encode(x), x.shape[2:])

    def loss(self, phi_t: torch.Tensor, l1_weight: float = 1e-7) -> torch.Tensor:
        """Reconstruction loss (He et al., eq. 1; alpha = ``l1_weight`` = 1e-7 in the paper).

        ``mean((phi_t - D(E(phi_t)))^2) + l1_weight * mean(|E(phi_t)|)``, the means over all elements;
        ``phi_t`` (B, in_channels, H, W). Returns a 0-dim tensor (0 for an empty batch); the means are
        accumulated in float64 and returned in float64 for float64 features, float32 otherwise.
        """
        where = "FeatureAutoencoder.loss"
        self._check_features(phi_t, "phi_t", where, self.in_channels)
        check_nonnegative_float(l1_weight, "l1_weight", where)
        z = self.encoder(phi_t)
        reconstruction = self.decode(z, phi_t.shape[2:])
        squared = (phi_t.to(COMPUTE_DTYPE) - reconstruction.to(COMPUTE_DTYPE)).square()
        l1 = z.to(COMPUTE_DTYPE).abs()
        result = mean_or_zero(squared) + l1_weight * mean_or_zero(l1)
        return result.to(result_dtype(phi_t))


class FeatureAdapter(nn.Sequential):
    """The student's feature adapter ``C_f`` (He et al., sec. 3.1): 3x3 conv (stride 1, padding 1), BN, ReLU.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W); ``out_channels`` is the autoencoder's
    ``latent_channels`` when the adapter feeds :class:`AdaptationLoss`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        where = "FeatureAdapter"
        in_channels = check_int(in_channels, "in_channels", where, 1)
        out_channels = check_int(out_channels, "out_channels", where, 1)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


def channel_scale(channels: int, p: float, q: float) -> float:
    """``C^max(0, 1/p - 1/q)``: the largest p-norm a vector of unit q-norm in C dimensions can have (Hoelder),
    so the p-norm of a difference of two such vectors lies in [0, 2 * channel_scale]."""
    return float(channels) ** max(0.0, 1.0 / p - 1.0 / q)


def adaptation_loss(
    adapted_s: torch.Tensor, encoded_t: torch.Tensor, p: float = 1, q: float = 2, eps: float = 1e-8,
    *, channel_invariant: bool = False,
) -> torch.Tensor:
    """Adaptation loss (He et al., eq. 2).

    ``adapted_s`` = ``C_f(phi_s)`` and ``encoded_t`` = ``E(phi_t)``, both (B, C, H, W) with identical shapes.
    At every position j the channel vectors are normalised, ``u_hat = u / (||u||_q + eps)``, and

        loss = 1/(B*H*W) * sum_{b, j} || s_hat_{b,j} - t_hat_{b,j} ||_p

    ``p`` and ``q`` are norm orders: real numbers >= 1 or ``float('inf')``.

    Scale: with p < q the value grows with the channel count C, as ``C^(1/p - 1/q)`` (p=1, q=2: about
    ``sqrt(4C/pi)`` between unrelated directions), so a weight such as the paper's 50 is tied to the paper's
    C. ``channel_invariant=True`` divides the loss by :func:`channel_scale` ``C^max(0, 1/p - 1/q)``, which puts
    it in [0, 2] whatever C: a fixed weight then carries over between channel counts. Either way the
    magnitude rule (:func:`fastkd.magnitude_weights`) is the portable way to weight it against the task
    loss. The paper's eq. 2 has no
    ``eps`` (added here so that an all-zero vector gives 0, not NaN) and does not state p and q; the
    defaults p=1, q=2 are the contract's. Computed in float64 (like every fastkd loss: near convergence
    the loss is a small difference of normalised vectors); returns a 0-dim tensor in the inputs' promoted
    dtype but at least float32 (the project's convention), gradients in each input's dtype. 0 when there
    are no positions (B = 0); NaN when an input holds NaN or Inf.
    Gradients flow to every input that requires grad (detach ``encoded_t`` to train the student only).
    """
    where = "adaptation_loss"
    check_student_teacher(adapted_s, encoded_t, where, s_name="adapted_s", t_name="encoded_t")
    if adapted_s.shape[1] != encoded_t.shape[1]:
        raise ValueError(
            f"{where}: channel counts differ: `adapted_s` has {adapted_s.shape[1]}, `encoded_t` has "
            f"{encoded_t.shape[1]}; build the FeatureAdapter with out_channels equal to the autoencoder's "
            f"latent_channels"
        )
    p = _check_norm_order(p, "p", where)
    q = _check_norm_order(q, "q", where)
    eps = check_positive_float(eps, "eps", where)
    check_bool(channel_invariant, "channel_invariant", where)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        x = x.to(COMPUTE_DTYPE)
        return x / (torch.linalg.vector_norm(x, ord=q, dim=1, keepdim=True) + eps)

    distances = torch.linalg.vector_norm(normalise(adapted_s) - normalise(encoded_t), ord=p, dim=1)
    loss = mean_or_zero(distances)
    if channel_invariant:
        loss = loss / channel_scale(adapted_s.shape[1], p, q)
    return loss.to(result_dtype(adapted_s, encoded_t))


class AdaptationLoss(nn.Module):
    """Module form of :func:`adaptation_loss` (He et al., eq. 2); ``forward(adapted_s, encoded_t)``.

    ``p``, ``q`` (norm orders, real >= 1 or ``float('inf')``), ``eps`` (> 0) and ``channel_invariant``
    (divide by ``C^max(0, 1/p - 1/q)``; see :func:`adaptation_loss`) are checked here, once.
    """

    def __init__(self, p: float = 1, q: float = 2, eps: float = 1e-8, *, channel_invariant: bool = False):
        super().__init__()
        where = "AdaptationLoss"
        self.p = _check_norm_order(p, "p", where)
        self.q = _check_norm_order(q, "q", where)
        self.eps = check_positive_float(eps, "eps", where)
        self.channel_invariant = check_bool(channel_invariant, "channel_invariant", where)

    def extra_repr(self) -> str:
        return f"p={self.p}, q={self.q}, eps={self.eps}, channel_invariant={self.channel_invariant}"

    def forward(self, adapted_s: torch.Tensor, encoded_t: torch.Tensor) -> torch.Tensor:
        """The loss of ``adapted_s`` = C_f(phi_s) against ``encoded_t`` = E(phi_t), both (B, C, H, W)."""
        return adaptation_loss(adapted_s, encoded_t, self.p, self.q, self.eps,
                               channel_invariant=self.channel_invariant)
