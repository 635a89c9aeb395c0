"""What the benchmarks compare: for each op, the implementations a user could pick instead of fastkd, and
fastkd's own backends, all computing the same loss (tests/test_benchmarks.py checks each against
``fastkd.reference``, forward and gradient).

- ``naive``: the formulation as public distillation code writes it, in the input's precision (float32 for
  16-bit inputs): the B x m x m affinity matrices materialised; the consistency map from eight shifted
  copies of the logits; the windowed graph from ``F.unfold`` copies of every node's neighbourhood.
- ``naive+compile``: ``torch.compile`` of ``naive`` (inductor, one graph per shape).
- ``gram-fp32`` / ``gram-fp64``: what an expert writes in plain PyTorch for the full graph, the C x C Gram
  identity ``sum_ij (a_s_ij - a_t_ij)^2 = ||S'S||^2 - 2||S'T||^2 + ||T'T||^2`` (and its per-row quadratic
  forms for the distillation loss), in float32 or float64.
- ``keops``: the all-pairs reduction as a pykeops LazyTensor, where pykeops is installed.
- ``kl_div``: pixel-wise KD with torch's fused ``F.kl_div(log_softmax(s / T), softmax(t / T))`` in float32.
- ``structkd`` / ``cirkd``: the authors' formulations, written here from their published definitions:
  StructKD's pooled pair-wise graph (Liu et al.'s ``pool_scale`` max pooling, detached ``L2 + 1e-8``) and
  CIRKD's graph over 2 x 2 max-pooled nodes (``F.normalize``).
- ``fastkd-<backend>``: ``fastkd.functional`` with ``backend=<backend>``, for every backend that has its own
  implementation of the op and can run on the device.

A provider is a function ``(s, t) -> 0-dim loss`` differentiable in ``s`` (and ``t``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import fastkd
import floors
from fastkd import _backends as fastkd_backends
from fastkd import reference
from fastkd.ops import costs

EPS = 1e-8  # the losses' default eps
WINDOW = 2  # the windowed graph's radius: 5 x 5 neighbourhoods
POOL_SCALE = 0.5  # StructKD's node grid: max-pooling patches of half the map per side
CIRKD_EPS = 1e-12  # F.normalize's floor under the norm, CIRKD's eps
TEMPERATURE = 1.0  # PixelwiseKDLoss's default


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def _working_precision(x: torch.Tensor) -> torch.Tensor:
    """16-bit inputs are computed in float32, as public code does with ``.float()``."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _normalised_nodes(f: torch.Tensor, eps: float = EPS, detach_norm: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, m), every column divided by its norm + eps (the norm a constant in backward
    with ``detach_norm``)."""
    f = _working_precision(f).flatten(2)
    norm = f.norm(dim=1, keepdim=True)
    return f / ((norm.detach() if detach_norm else norm) + eps)


def _affinity(f: torch.Tensor, eps: float = EPS, detach_norm: bool = False) -> torch.Tensor:
    f_hat = _normalised_nodes(f, eps, detach_norm)
    return f_hat.transpose(1, 2) @ f_hat  # B x m x m


# ---------------------------------------------------------------- naive formulations (materialised)

def naive_affinity_full(s, t):
    return ((_affinity(s) - _affinity(t)) ** 2).mean()


def naive_distillation(s, t):
    m = s.shape[2] * s.shape[3]
    difference = (_affinity(s) - _affinity(t)) / m
    return difference.norm(dim=2).sum() / s.shape[0]


def _window_affinities(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, m): node i's affinity with each of its K = (2r+1)^2 window neighbours, 0 outside
    the image, from an ``F.unfold`` copy of every node's neighbourhood (K copies of the features)."""
    batch, channels, height, width = f.shape
    f_hat = _normalised_nodes(f).view(batch, channels, height, width)
    size = 2 * WINDOW + 1
    neighbours = F.unfold(f_hat, size, padding=WINDOW).view(batch, channels, size * size, height * width)
    return (neighbours * f_hat.flatten(2).unsqueeze(2)).sum(dim=1)


def naive_affinity_window(s, t):
    height, width = s.shape[2:]
    size = 2 * WINDOW + 1
    inside = torch.ones(1, 1, height, width, dtype=torch.float32, device=s.device)
    connected_pairs = F.unfold(inside, size, padding=WINDOW).sum()  # pairs with both ends in the image
    squares = (_window_affinities(s) - _window_affinities(t)) ** 2
    return squares.sum() / (s.shape[0] * connected_pairs)


def _neighbour_map(logits: torch.Tensor) -> torch.Tensor:
    """c(x) = sum over the 8 neighbours of ||l(y) - l(x)||^2 on the interior pixels, from 8 shifted copies."""
    logits = _working_precision(logits)
    height, width = logits.shape[2:]
    centre = logits[:, :, 1:height - 1, 1:width - 1]
    shifted = torch.stack([logits[:, :, 1 + dy:height - 1 + dy, 1 + dx:width - 1 + dx]
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
    return ((shifted - centre) ** 2).sum(dim=(0, 2))


def naive_consistency(s, t):
    return ((_neighbour_map(s) - _neighbour_map(t)) ** 2).mean()


def _pool_scale_kernel(f: torch.Tensor) -> tuple:
    """StructKD's max-pooling kernel (and stride): ``int(H * 0.5) x int(W * 0.5)``."""
    return int(f.shape[2] * POOL_SCALE), int(f.shape[3] * POOL_SCALE)


def _max_nodes(f: torch.Tensor, kernel) -> torch.Tensor:
    """Max pooling with ceil mode: the last row and column of patches may be partial."""
    return F.max_pool2d(_working_precision(f), kernel, kernel, ceil_mode=True)


def naive_affinity_pooled(s, t):
    kernel = _pool_scale_kernel(s)
    a_s = _affinity(_max_nodes(s, kernel), detach_norm=True)
    return ((a_s - _affinity(_max_nodes(t, kernel), detach_norm=True)) ** 2).mean()


def naive_affinity_patch_max(s, t):
    a_s = _affinity(_max_nodes(s, 2), eps=CIRKD_EPS)
    return ((a_s - _affinity(_max_nodes(t, 2), eps=CIRKD_EPS)) ** 2).mean()


def _log_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(_working_precision(logits) / temperature, dim=1)


def naive_pixelwise_kd(s, t):
    """``T^2 KL(q_t || q_s)`` per pixel written out, averaged over the pixels."""
    log_q_s, log_q_t = _log_probabilities(s, TEMPERATURE), _log_probabilities(t, TEMPERATURE)
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1).mean() * TEMPERATURE**2


def naive_probability(s, t):
    p_s = F.softmax(_working_precision(s), dim=1)
    return ((p_s - F.softmax(_working_precision(t), dim=1)) ** 2).sum(dim=1).mean()


# ---------------------------------------------------------------- the authors' formulations and torch's KL

def structkd_affinity_pooled(s, t):
    """Liu et al.'s pooled pair-wise graph: max pooling with kernel = stride = half the map per side (ceil
    mode), every node divided by its detached L2 norm + 1e-8, the Gram of the nodes by ``bmm``, the squared
    difference divided by m^2 and by B, summed. (Their code casts with ``.float()``; here 16-bit inputs go to
    float32 and float64 stays float64, for the tests.)"""
    def similarity(f):
        f = _working_precision(f)
        f = (f / (f.pow(2).sum(dim=1, keepdim=True).sqrt().detach() + 1e-8)).flatten(2)
        return torch.bmm(f.transpose(1, 2), f)

    kernel = _pool_scale_kernel(s)
    f_s, f_t = (F.max_pool2d(f, kernel, kernel, padding=0, ceil_mode=True) for f in (s, t))
    m = f_t.shape[2] * f_t.shape[3]
    return ((similarity(f_t) - similarity(f_s)) ** 2 / m**2 / f_t.shape[0]).sum()


def cirkd_affinity_patch_max(s, t):
    """CIRKD's pair-wise graph (the structural-KD term of Yang et al.'s code): 2 x 2 max pooling (ceil mode),
    ``F.normalize`` over the channels (the norm clamped below at 1e-12, not detached), ``bmm``, the mean of
    the squared difference over the B m^2 entries."""
    def similarity(f):
        f = F.max_pool2d(_working_precision(f), 2, 2, padding=0, ceil_mode=True)
        f = F.normalize(f, p=2, dim=1).flatten(2)
        return torch.bmm(f.transpose(1, 2), f)

    return ((similarity(s) - similarity(t)) ** 2).mean()


def kl_div_pixelwise_kd(s, t):
    """``F.kl_div`` on the per-pixel log-probabilities: summed over channels and pixels, divided by the
    number of pixels B H W (not ``batchmean``, which divides by B only), times T^2."""
    s, t = _working_precision(s), _working_precision(t)
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, dim=1), F.softmax(t / TEMPERATURE, dim=1), reduction="sum")
    return kl / (s.shape[0] * s.shape[2] * s.shape[3]) * TEMPERATURE**2


# ---------------------------------------------------------------- the expert's Gram identity

def gram_affinity_full(s, t, dtype):
    """``(||S'S||^2 - 2||S'T||^2 + ||T'T||^2) / (B m^2)`` with C x C Grams in ``dtype``."""
    s_hat, t_hat = _normalised_nodes(s.to(dtype)), _normalised_nodes(t.to(dtype))
    ss = s_hat @ s_hat.transpose(1, 2)
    st = s_hat @ t_hat.transpose(1, 2)
    tt = t_hat @ t_hat.transpose(1, 2)
    total = (ss**2).sum() - 2 * (st**2).sum() + (tt**2).sum()
    return (total / (s.shape[0] * s_hat.shape[2] ** 2)).to(_loss_dtype(s))


def gram_distillation(s, t, dtype):
    """Row i of a_s - a_t has squared norm ``s_i'(SS')s_i - 2 s_i'(ST')t_i + t_i'(TT')t_i``."""
    s_hat, t_hat = _normalised_nodes(s.to(dtype)), _normalised_nodes(t.to(dtype))
    m = s_hat.shape[2]
    rows = ((s_hat * ((s_hat @ s_hat.transpose(1, 2)) @ s_hat)).sum(dim=1)
            - 2 * (s_hat * ((s_hat @ t_hat.transpose(1, 2)) @ t_hat)).sum(dim=1)
            + (t_hat * ((t_hat @ t_hat.transpose(1, 2)) @ t_hat)).sum(dim=1))
    return (rows.clamp_min(0).sqrt().sum() / (m * s.shape[0])).to(_loss_dtype(s))


def _loss_dtype(s: torch.Tensor) -> torch.dtype:
    return torch.float64 if s.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- KeOps

def _keops_rows(s, t):
    """``r_i = sum_j (a_s_ij - a_t_ij)^2`` as a KeOps reduction over j, never stored: (B, m)."""
    from pykeops.torch import LazyTensor

    s_hat = _normalised_nodes(s).transpose(1, 2).contiguous()  # (B, m, C)
    t_hat = _normalised_nodes(t).transpose(1, 2).contiguous()
    s_i, s_j = LazyTensor(s_hat[:, :, None, :]), LazyTensor(s_hat[:, None, :, :])
    t_i, t_j = LazyTensor(t_hat[:, :, None, :]), LazyTensor(t_hat[:, None, :, :])
    return (((s_i | s_j) - (t_i | t_j)) ** 2).sum(dim=2).squeeze(-1)


def keops_affinity_full(s, t):
    rows = _keops_rows(s, t)
    return rows.sum() / (rows.shape[0] * rows.shape[1] ** 2)


def keops_distillation(s, t):
    rows = _keops_rows(s, t)
    return rows.clamp_min(0).sqrt().sum() / (rows.shape[1] * rows.shape[0])


# ---------------------------------------------------------------- the ops and their providers

@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # naive | compiled | expert | keops | authors | fastkd
    cost_exponent: int  # the per-call time grows like m ** this at fixed B and C
    loss: Callable  # (s, t) -> 0-dim loss
    compiles: bool = False  # its first call at a new shape compiles code (torch.compile, KeOps)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    title: str
    loss_class: type  # the fastkd loss
    loss_kwargs: Dict
    reference: Callable  # fastkd.reference's literal float64 definition, (s, t) -> loss
    naive: Callable
    naive_cost_exponent: int  # the naive time grows like m ** this at fixed B and C
    cost: Callable  # fastkd.ops.costs.Shape -> {"forward": Cost, "backward": Cost}, for the floors
    gram: Optional[Callable] = None  # (s, t, dtype) -> loss
    keops: Optional[Callable] = None
    others: Tuple[Provider, ...] = ()  # further plain-PyTorch providers: torch's own function, the authors'
    fastkd_op: str = ""  # the op of fastkd._backends.IMPLEMENTATIONS it runs; "" for the op of this name
    logits: bool = False  # its inputs are logits (no ReLU), its literal reference costs per pixel

    @property
    def implementation_op(self) -> str:
        return self.fastkd_op or self.name

    @property
    def max_pools(self) -> bool:
        """Whether its nodes are max-pooled: where a patch's maximum is tied (post-ReLU zeros), the literal
        reference's ``amax`` splits the gradient among the tied pixels, ``F.max_pool2d`` (every provider,
        fastkd's torch backend included) gives it to the first; both are subgradients of the same loss."""
        return self.loss_kwargs.get("pool") == "max" or self.loss_kwargs.get("pool_scale") is not None


POOLED = {"pool_scale": POOL_SCALE, "detach_norm": True}  # StructKD's graph
PATCH_MAX = {"patch": 2, "pool": "max", "eps": CIRKD_EPS}  # CIRKD's graph

OPS = {
    "affinity_full": Op(
        "affinity_full", "PairwiseAffinityLoss, full graph (Liu et al. eq. 2)", fastkd.PairwiseAffinityLoss, {},
        reference.pairwise_affinity_loss, naive_affinity_full, 2, floors.full_graph, gram_affinity_full,
        keops_affinity_full),
    "affinity_window": Op(
        "affinity_window", f"PairwiseAffinityLoss, window={WINDOW} ({2 * WINDOW + 1}x{2 * WINDOW + 1} neighbourhoods)",
        fastkd.PairwiseAffinityLoss, {"window": WINDOW},
        functools.partial(reference.pairwise_affinity_loss, window=WINDOW), naive_affinity_window, 1,
        functools.partial(costs.window_graph, radius=WINDOW)),
    "affinity_distillation": Op(
        "affinity_distillation", "AffinityDistillationLoss (He et al. eqs. 3-4)", fastkd.AffinityDistillationLoss, {},
        reference.affinity_distillation_loss, naive_distillation, 2, functools.partial(floors.full_graph, per_row=True),
        gram_distillation, keops_distillation, fastkd_op="affinity_full"),
    "consistency": Op(
        "consistency", "ConsistencyLoss, 8-neighbour map (Xie et al. sec. 3.1)", fastkd.ConsistencyLoss, {},
        reference.consistency_loss, naive_consistency, 1, costs.consistency, logits=True),
    "affinity_pooled": Op(
        "affinity_pooled", "PairwiseAffinityLoss(pool_scale=0.5, detach_norm=True), StructKD's pooled graph",
        fastkd.PairwiseAffinityLoss, POOLED, functools.partial(reference.pairwise_affinity_loss, **POOLED),
        naive_affinity_pooled, 1, floors.full_graph,
        others=(Provider("structkd", "authors", 1, structkd_affinity_pooled),), fastkd_op="affinity_full"),
    "affinity_patch_max": Op(
        "affinity_patch_max", f"PairwiseAffinityLoss(patch=2, pool='max', eps={CIRKD_EPS:g}), CIRKD's graph",
        fastkd.PairwiseAffinityLoss, PATCH_MAX, functools.partial(reference.pairwise_affinity_loss, **PATCH_MAX),
        naive_affinity_patch_max, 2, floors.full_graph,
        others=(Provider("cirkd", "authors", 2, cirkd_affinity_patch_max),), fastkd_op="affinity_full"),
    "pixelwise_kd": Op(
        "pixelwise_kd", "PixelwiseKDLoss (Liu et al. eq. 1; Hinton et al.)", fastkd.PixelwiseKDLoss, {},
        reference.pixelwise_kd_loss, naive_pixelwise_kd, 1, costs.pixelwise_kd,
        others=(Provider("kl_div", "expert", 1, kl_div_pixelwise_kd),), logits=True),
    "probability": Op(
        "probability", "ProbabilityLoss (Xie et al. sec. 3.1)", fastkd.ProbabilityLoss, {},
        reference.probability_loss, naive_probability, 1, costs.probability, logits=True),
}


# On CPU tensors these run through an interpreter or emulator that checks correctness, not speed.
EMULATED_ON_CPU = {"triton": "on CPU tensors it runs in Triton's interpreter (TRITON_INTERPRET=1), not timed",
                   "cuda": "on CPU tensors it runs in fastkd's CUDA emulator (FASTKD_EMULATE_CUDA=1), not timed"}
PROVIDER_NAMES = ("naive", "naive+compile", "gram-fp32", "gram-fp64", "keops",
                  *dict.fromkeys(other.name for op in OPS.values() for other in op.others),
                  *(f"fastkd-{backend}" for backend in fastkd.BACKENDS if backend != "auto"))


def _fastkd_loss(op: Op, backend: str) -> Callable:
    return op.loss_class(**op.loss_kwargs, backend=backend)


def providers(op: Op, device: torch.device):
    """``(providers that can run here, {provider name: why not})`` for ``op`` on ``device``."""
    runnable = [Provider("naive", "naive", op.naive_cost_exponent, op.naive),
                Provider("naive+compile", "compiled", op.naive_cost_exponent, torch.compile(op.naive, dynamic=False),
                         compiles=True)]
    unavailable = {}
    if op.gram is not None:
        runnable += [Provider("gram-fp32", "expert", 1, functools.partial(op.gram, dtype=torch.float32)),
                     Provider("gram-fp64", "expert", 1, functools.partial(op.gram, dtype=torch.float64))]
    if op.keops is not None:
        if importlib.util.find_spec("pykeops") is None:
            unavailable["keops"] = "pykeops is not installed (`pip install pykeops`)"
        else:
            runnable.append(Provider("keops", "keops", 2, op.keops, compiles=True))
    runnable += op.others
    for backend, reason in op.loss_class.available_backends(device).items():
        name = f"fastkd-{backend}"
        fastkd_op = op.implementation_op
        if reason is None and backend not in fastkd_backends.IMPLEMENTATIONS[fastkd_op]:
            # the loss accepts the backend for another of its ops and runs this one with torch's implementation
            reason = f"fastkd has no {backend} implementation of {fastkd_op}: backend={backend!r} runs the torch one"
        if reason is None and device.type == "cpu" and backend in EMULATED_ON_CPU:
            reason = EMULATED_ON_CPU[backend]
        if reason is None:
            runnable.append(Provider(name, "fastkd", 1, _fastkd_loss(op, backend)))
        else:
            unavailable[name] = reason
    return runnable, unavailable


def auto_provider(op: Op, device: torch.device) -> str:
    """The provider that runs what ``backend="auto"`` picks for ``op`` on ``device``: ``fastkd-<backend>``."""
    backend, _ = fastkd_backends.resolve("auto", op.loss_class.__name__, op.implementation_op, device)
    return f"fastkd-{backend}"
