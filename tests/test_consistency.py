"""ConsistencyLoss (8-neighbour map), torch backend, against the literal float64 reference. (The kernel
backends, which ``auto`` prefers where they are available, are tested in test_consistency_kernels.py and
test_cpp_consistency.py.)"""

import functools

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd import reference
from helpers import DTYPES, as_layout, compare_with_reference, randn
from test_pairwise_affinity import assert_relative_error_below, near_converged_pair

consistency_loss = functools.partial(F.consistency_loss, backend="torch")

CONFIGS = [dict(), dict(border="same"), dict(dilation=2), dict(dilation=3, border="same", reduction="sum"),
           dict(reduction="sum")]
SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 19, 19, 5, 5)]  # B, Cs, Ct, H, W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference(config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    if config.get("border", "valid") == "valid" and min(height, width) < 2 * config.get("dilation", 1) + 1:
        height = width = 2 * config["dilation"] + 1  # the smallest map "valid" accepts
    inputs = [randn((batch, cs, height, width), gen, dtype), randn((batch, ct, height, width), gen, dtype)]
    compare_with_reference(consistency_loss, reference.consistency_loss, inputs, **config)


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2)], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_memory_layouts(layout, config, gen):
    s, t = randn((2, 6, 9, 7), gen), randn((2, 3, 9, 7), gen)
    compare_with_reference(consistency_loss, reference.consistency_loss,
                           [as_layout(s, layout), as_layout(t, layout)], **config)


@pytest.mark.parametrize("border", ["valid", "same"])
def test_gradient_reaches_both_inputs_when_both_require_grad(border, gen):
    inputs = [randn((2, 4, 6, 7), gen, torch.float64), randn((2, 2, 6, 7), gen, torch.float64)]
    compare_with_reference(consistency_loss, reference.consistency_loss, inputs, grad_inputs=(0, 1),
                           border=border)
    s, t = inputs[0].requires_grad_(), inputs[1]
    consistency_loss(s, t, border=border).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("config", [dict(), dict(border="same"), dict(dilation=2, border="same")], ids=str)
def test_gradcheck(config, gen):
    s = randn((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = randn((2, 2, 5, 6), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: consistency_loss(a, b, **config), (s, t))


@pytest.mark.parametrize("border", ["valid", "same"])
def test_near_convergence_float32(border, gen):
    s, t = near_converged_pair((2, 19, 64, 64), gen)
    assert_relative_error_below(consistency_loss, reference.consistency_loss, s, t, 1e-4, border=border)


def test_saves_no_per_neighbour_tensor_for_backward(gen):
    """Only the inputs and the (B, H', W') map difference are kept for backward: no shifted copies."""
    s, t = randn((2, 5, 16, 16), gen).requires_grad_(), randn((2, 5, 16, 16), gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = consistency_loss(s, t)
    loss.backward()
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= 2 * 14 * 14


def test_module_matches_function(gen):
    s, t = randn((2, 4, 5, 6), gen), randn((2, 3, 5, 6), gen)
    assert torch.equal(fastkd.ConsistencyLoss(border="same", dilation=2)(s, t),
                       F.consistency_loss(s, t, border="same", dilation=2))
