"""PairwiseAffinityLoss (full and windowed graph) against the literal float64 reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd import functional as F
from fastkd import reference
from fastkd.ops import pairwise_affinity as op
from fastkd.ops.nodes import pool_kernel
from helpers import DTYPES, as_layout, compare_with_reference, randn

CONFIGS = [
    dict(),
    dict(patch=2),
    dict(patch=(3, 2), pool="max"),
    dict(patch=4, window=1),
    dict(window=0, eps=0.5),  # only the diagonal a_ii = (|f| / (|f| + eps))^2: needs a large eps to be non-zero
    dict(window=1),
    dict(window=3, reduction="sum"),
    dict(window=50),  # covers the whole grid: the full graph
    dict(pool_scale=0.5),
    dict(pool_scale=0.3, window=1),
    dict(detach_norm=True),
    dict(detach_norm=True, window=2, patch=2),
    dict(eps=1e-2, reduction="sum"),
]
SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 33, 17, 5, 5)]  # B, Cs, Ct, H, W


def unique_patch_maxima(x, gen, config):
    """Adds 16 (far above any N(0, 1) sample) to one random pixel of every patch so that max pooling has
    no ties, even in bfloat16 (tied maxima have many valid subgradients: torch picks one element, the
    reference's amax splits evenly)."""
    if config.get("pool") != "max" and config.get("pool_scale") is None:
        return x
    patch = config.get("patch", 1)
    patch = (patch, patch) if isinstance(patch, int) else patch
    kernel = pool_kernel(x.shape[2], x.shape[3], patch, config.get("pool_scale"))
    ranks = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    _, winners = torch.nn.functional.max_pool2d(ranks, kernel, kernel, ceil_mode=True, return_indices=True)
    bump = torch.zeros(x.shape, dtype=torch.float64).flatten(2).scatter_(2, winners.flatten(2), 16.0)
    return (x.double() + bump.view(x.shape)).to(x.dtype)


def pair(shape, gen, dtype, config=None):
    batch, cs, ct, height, width = shape
    s, t = randn((batch, cs, height, width), gen, dtype), randn((batch, ct, height, width), gen, dtype)
    return unique_patch_maxima(s, gen, config or {}), unique_patch_maxima(t, gen, config or {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference(config, shape, dtype, gen):
    compare_with_reference(F.pairwise_affinity_loss, reference.pairwise_affinity_loss, pair(shape, gen, dtype, config),
                           **config)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("config", [dict(), dict(window=2), dict(patch=3, pool="max")], ids=str)
def test_memory_layouts(config, layout, gen):
    s, t = pair((2, 6, 5, 11, 7), gen, torch.float32, config)
    compare_with_reference(F.pairwise_affinity_loss, reference.pairwise_affinity_loss,
                           [as_layout(s, layout), as_layout(t, layout)], **config)


@pytest.mark.parametrize("config", [dict(), dict(window=1)], ids=str)
def test_gradient_reaches_teacher_only_when_it_requires_grad(config, gen):
    s, t = pair((2, 4, 6, 5, 8), gen, torch.float64)
    compare_with_reference(F.pairwise_affinity_loss, reference.pairwise_affinity_loss, [s, t],
                           grad_inputs=(0, 1), **config)
    s.requires_grad_()
    F.pairwise_affinity_loss(s, t, **config).backward()
    assert s.grad is not None and t.grad is None


# detach_norm=True is left out on purpose: its backward treats ||f|| as a constant, so it is not the
# derivative gradcheck measures (test_matches_reference checks it against the reference, which detaches too).
@pytest.mark.parametrize("config", [dict(), dict(window=1), dict(patch=2, pool="max", window=1),
                                    dict(pool_scale=0.5), dict(patch=(2, 3), reduction="sum")], ids=str)
def test_gradcheck(config, gen):
    s, t = pair((2, 3, 4, 5, 6), gen, torch.float64, config)
    assert torch.autograd.gradcheck(lambda a, b: F.pairwise_affinity_loss(a, b, **config),
                                    (s.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("cs,ct,m", [(4, 6, 5), (3, 3, 40), (64, 48, 9), (8, 8, 200)])
def test_gram_and_direct_algorithms_agree(cs, ct, m, gen):
    s_hat = torch.nn.functional.normalize(randn((2, cs, m), gen, torch.float64), dim=1)
    t_hat = torch.nn.functional.normalize(randn((2, ct, m), gen, torch.float64), dim=1)
    torch.testing.assert_close(op.full_graph_sum(s_hat, t_hat, gram=True),
                               op.full_graph_sum(s_hat, t_hat, gram=False), rtol=1e-12, atol=0)


def test_cost_model_prefers_direct_for_few_nodes_and_gram_for_many():
    assert not op.use_gram(9, 512, 512)  # pool_scale=0.5 on a 65x65 map: 3x3 nodes
    assert op.use_gram(65 * 65, 512, 512)
    assert op.use_gram(16384, 19, 19)


@pytest.mark.parametrize("window,rows,cols", [(0, 4, 5), (1, 1, 1), (2, 3, 9), (4, 5, 2)])
def test_window_term_count(window, rows, cols):
    expected = reference.affinity.window_matrix(rows, cols, window).sum().item()
    assert op.window_pairs_1d(rows, window) * op.window_pairs_1d(cols, window) == expected


def correlated_relu_features(shape, gen):
    """Spatially smooth, channel-correlated, post-ReLU features, like a backbone's."""
    batch, channels, height, width = shape
    z = torch.nn.functional.avg_pool2d(randn(shape, gen, torch.float64), 5, 1, 2, count_include_pad=False)
    mix = randn((channels, channels), gen, torch.float64) / channels**0.5
    return torch.relu(torch.einsum("dc,bchw->bdhw", mix, z) + 0.3)


def near_converged_pair(shape, gen):
    """Teacher = student + 1e-3 relative noise, both float32."""
    s = correlated_relu_features(shape, gen)
    t = s * (1 + 1e-3 * randn(shape, gen, torch.float64))
    return s.float(), t.float()


def assert_relative_error_below(loss_fn, reference_fn, s, t, bound, **config):
    """Loss and gradient (norm-wise) within ``bound`` relative of the float64 reference."""
    s = s.requires_grad_()
    loss = loss_fn(s, t, **config)
    (grad,) = torch.autograd.grad(loss, s)
    exact_s = s.detach().double().requires_grad_()
    expected = reference_fn(exact_s, t.double(), **config)
    (expected_grad,) = torch.autograd.grad(expected, exact_s)
    assert expected > 0
    assert abs(loss.item() - expected.item()) <= bound * expected.item()
    assert (grad.double() - expected_grad).norm() <= bound * expected_grad.norm()


# Max pooling is checked on tie-free inputs above: post-ReLU zeros tie, and tied maxima have many valid
# subgradients (torch's max_pool2d picks one element, the reference's amax splits evenly).
@pytest.mark.parametrize("config", [dict(), dict(window=1), dict(window=3, patch=2), dict(patch=4)], ids=str)
def test_near_convergence_float32(config, gen):
    s, t = near_converged_pair((2, 48, 64, 64), gen)
    assert_relative_error_below(F.pairwise_affinity_loss, reference.pairwise_affinity_loss, s, t, 1e-4, **config)


def test_near_convergence_float32_m16384(gen):
    s, t = near_converged_pair((1, 32, 128, 128), gen)
    assert_relative_error_below(F.pairwise_affinity_loss, reference.pairwise_affinity_loss, s, t, 1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements, and of bytes, of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
                self.largest_bytes = max(self.largest_bytes, x.numel() * x.element_size())
        return out


@pytest.mark.parametrize("config", [dict(), dict(window=2), dict(patch=2, window=1)], ids=str)
def test_no_m_by_m_tensor_in_forward_or_backward(config, gen):
    batch, channels, height, width = 2, 8, 64, 64
    s = randn((batch, channels, height, width), gen).requires_grad_()
    t = randn((batch, channels + 3, height, width), gen)
    with LargestTensor() as recorder:
        F.pairwise_affinity_loss(s, t, **config).backward()
    assert recorder.largest <= batch * (channels + 3) * height * width  # O(B C m), never m x m = 16.7M


def test_module_matches_function_and_describes_itself(gen):
    s, t = pair((2, 4, 5, 6, 7), gen, torch.float32)
    module = fastkd.PairwiseAffinityLoss(patch=2, window=1, reduction="sum")
    assert torch.equal(module(s, t), F.pairwise_affinity_loss(s, t, patch=2, window=1, reduction="sum"))
    assert "window=1" in repr(module) and "backend='auto'" in repr(module)
