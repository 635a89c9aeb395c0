"""Triton kernels of the windowed PairwiseAffinityLoss graph against the literal float64 reference."""

import math

import pytest
import torch

import helpers
from fastkd import reference
from fastkd.ops._common import result_dtype
from fastkd.ops.nodes import pool_kernel
from fastkd.ops.pairwise_affinity import PairwiseAffinityConfig, window_pairs_1d
from helpers import DTYPES, TRITON_DEVICE, as_layout, compare_with_reference, randn

kernels = helpers.triton_kernels("affinity_window")
BLOCK_CHANNELS = kernels.BLOCK_CHANNELS


def window_loss(s, t, patch=1, pool="avg", pool_scale=None, window=0, eps=1e-8, detach_norm=False,
                reduction="mean"):
    """The windowed loss through the kernels, with the reference's signature: the kernels' sum, divided by
    the number of (b, i, j) terms for "mean", in the dtype the public loss returns."""
    config = PairwiseAffinityConfig.make(patch=patch, pool=pool, pool_scale=pool_scale, window=window, eps=eps,
                                         detach_norm=detach_norm, reduction=reduction)
    total = kernels.window_graph_sum(s, t, config)
    if reduction == "mean":
        rows, cols = reference.affinity.node_grid_shape(s.shape[2], s.shape[3], config.patch, pool_scale)
        total = total / (s.shape[0] * window_pairs_1d(rows, window) * window_pairs_1d(cols, window))
    return total.to(result_dtype(s, t))


def reference_loss(s, t, **config):
    """The literal float64 reference."""
    return reference.pairwise_affinity_loss(s, t, **config)


def unique_patch_maxima(x, gen, config):
    """Adds 16 (far above any N(0, 1) sample) to one random pixel of every patch so that max pooling has no
    ties, even in bfloat16: tied maxima have many valid subgradients and the reference splits them evenly."""
    if config.get("pool") != "max" and config.get("pool_scale") is None:
        return x
    patch = config.get("patch", 1)
    kernel = pool_kernel(x.shape[2], x.shape[3], (patch, patch) if isinstance(patch, int) else patch,
                         config.get("pool_scale"))
    ranks = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    _, winners = torch.nn.functional.max_pool2d(ranks, kernel, kernel, ceil_mode=True, return_indices=True)
    bump = torch.zeros(x.shape, dtype=torch.float64).flatten(2).scatter_(2, winners.flatten(2), 16.0)
    return (x.double() + bump.view(x.shape)).to(x.dtype)


def pair(shape, gen, dtype=torch.float64, config=None):
    """Student (B, Cs, H, W) and teacher (B, Ct, H, W) on the Triton device."""
    batch, cs, ct, height, width = shape
    s = unique_patch_maxima(randn((batch, cs, height, width), gen, dtype), gen, config or {})
    t = unique_patch_maxima(randn((batch, ct, height, width), gen, dtype), gen, config or {})
    return s.to(TRITON_DEVICE), t.to(TRITON_DEVICE)


# (config, (B, Cs, Ct, H, W)): windows 0-2, every pooling, both detach_norm, odd grids, Cs != Ct.
CASES = [
    (dict(window=0, eps=0.5), (1, 5, 3, 4, 5)),  # only a_ii = (|f| / (|f| + eps))^2: needs a large eps
    (dict(window=1), (2, 5, 3, 7, 13)),
    (dict(window=2, reduction="sum"), (1, 4, 6, 6, 5)),
    (dict(window=1, patch=(2, 3), detach_norm=True), (1, 3, 5, 7, 11)),  # 4 x 4 nodes, partial patches
    (dict(window=2, patch=2, pool="max"), (1, 4, 3, 7, 8)),  # 4 x 4 nodes, partial patches
    (dict(window=1, pool_scale=0.3, detach_norm=True), (1, 3, 4, 10, 9)),  # 3 x 2 max patches, 4 x 5 nodes
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape", CASES, ids=str)
def test_matches_reference(config, shape, dtype, gen):
    compare_with_reference(window_loss, reference_loss, pair(shape, gen, dtype, config), **config)


def test_window_covering_the_grid(gen):
    """r >= max(grid) - 1 (routed to the full graph by the caller) is still the windowed sum."""
    compare_with_reference(window_loss, reference_loss, pair((1, 3, 4, 3, 4), gen), window=5)


def factor(n):
    """rows x cols = n with rows the largest divisor of n up to sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_block_boundaries(delta, gen):
    """Node counts and channel counts around the kernels' block sizes."""
    rows, cols = factor(kernels.BLOCK_N + delta)
    shape = (1, BLOCK_CHANNELS + delta, BLOCK_CHANNELS - delta, rows, cols)
    compare_with_reference(window_loss, reference_loss, pair(shape, gen), grad_inputs=(0, 1),
                           window=1)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_memory_layouts_and_teacher_gradient(layout, gen):
    config = dict(window=1, patch=(2, 1), pool="max")
    s, t = pair((2, 6, 5, 7, 5), gen, torch.float32, config)
    _, (grad_s, grad_t) = compare_with_reference(
        window_loss, reference_loss, [as_layout(s, layout), as_layout(t, layout)],
        grad_inputs=(0, 1), **config)
    assert grad_s.shape == s.shape and grad_t.shape == t.shape


def test_gradient_reaches_teacher_only_when_it_requires_grad(gen):
    s, t = pair((1, 3, 4, 5, 6), gen)
    s.requires_grad_()
    window_loss(s, t, window=1).backward()
    assert s.grad is not None and t.grad is None
    t.requires_grad_()
    s.requires_grad_(False)
    window_loss(s, t, window=1).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


# detach_norm=True is left out: its backward treats ||f|| as a constant, which is not the derivative
# gradcheck measures (test_matches_reference checks it against the reference, which detaches too).
@pytest.mark.parametrize("config,shape", [(dict(window=1), (1, 2, 3, 4, 5)),
                                          (dict(window=1, patch=2, pool="max", reduction="sum"), (1, 2, 3, 6, 6))],
                         ids=str)
def test_gradcheck(config, shape, gen):
    s, t = pair(shape, gen, torch.float64, config)
    assert torch.autograd.gradcheck(lambda a, b: window_loss(a, b, **config),
                                    (s.requires_grad_(), t.requires_grad_()), fast_mode=True)


def test_opcheck(gen):
    s, t = pair((1, 3, 2, 4, 5), gen)
    forward_args = (s.requires_grad_(), t.requires_grad_(), 2, 1, False, 1, 1e-8, False)
    torch.library.opcheck(torch.ops.fastkd.triton_affinity_window_forward, forward_args)
    total, difference, s_norms, t_norms = torch.ops.fastkd.triton_affinity_window_forward(*forward_args)
    assert total.dtype == torch.float64 and s_norms.shape == t_norms.shape == (1, 2 * 5)
    assert difference.shape == (1, 1 * 3 + 2, 2 * 5)  # offsets (0, 0), (0, 1) and (1, -1..1)
    grad = torch.ones((), dtype=torch.float64, device=TRITON_DEVICE)
    backward_args = (grad, s.detach(), t.detach(), difference, s_norms, t_norms, 2, 1, False, 1, 1e-8, True,
                     False, True)
    torch.library.opcheck(torch.ops.fastkd.triton_affinity_window_backward, backward_args)
    grad_s, grad_t = torch.ops.fastkd.triton_affinity_window_backward(*backward_args)
    assert grad_s.shape == (0,) and grad_t.shape == t.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("which,value", [(0, float("nan")), (1, float("inf")), (0, float("-inf"))])
def test_non_finite_input_gives_nan(which, value, gen):
    inputs = list(pair((1, 3, 4, 5, 6), gen))
    inputs[which][0, 1, 2, 3] = value
    assert torch.isnan(window_loss(*inputs, window=1, patch=2))


def test_bitwise_reproducible(gen):
    s, t = pair((2, BLOCK_CHANNELS + 2, BLOCK_CHANNELS + 1, 4, 5), gen, torch.float32)

    def run():
        a, b = s.detach().requires_grad_(), t.detach().requires_grad_()
        loss = window_loss(a, b, window=1)
        return (loss, *torch.autograd.grad(loss, (a, b)))

    assert all(torch.equal(x, y) for x, y in zip(run(), run()))


def test_near_convergence_float32(gen):
    """Teacher = student * (1 + 1e-3 noise): the loss is a small difference of affinities that agree to
    ~1e-3, so float32 accumulation would leave ~1e-4 relative errors; float64 accumulation does not."""
    shape = (1, 16, 32, 32)
    z = torch.nn.functional.avg_pool2d(randn(shape, gen, torch.float64), 5, 1, 2, count_include_pad=False)
    s64 = torch.relu(z + 0.3)
    t = (s64 * (1 + 1e-3 * randn(shape, gen, torch.float64))).float().to(TRITON_DEVICE)
    s = s64.float().to(TRITON_DEVICE).requires_grad_()
    loss = window_loss(s, t, window=2, reduction="sum")
    (grad,) = torch.autograd.grad(loss, s)
    exact_s = s.detach().double().cpu().requires_grad_()
    expected = reference.pairwise_affinity_loss(exact_s, t.double().cpu(), window=2, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, exact_s)
    assert expected > 0
    assert abs(loss.item() - expected.item()) <= 1e-4 * expected.item()
    assert (grad.double().cpu() - expected_grad).norm() <= 1e-4 * expected_grad.norm()


def test_compiles_fullgraph(gen):
    s, t = pair((2, 3, 4, 6, 7), gen, torch.float32)

    def fn(a, b):
        return window_loss(a, b, window=1, patch=(2, 1)) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss, expected = compiled(a, b), fn(s.requires_grad_(), t.requires_grad_())
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(loss, (a, b)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
