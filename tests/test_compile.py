"""The torch backend under ``torch.compile(fullgraph=True)``: no graph break, same loss and gradient.

ConsistencyLoss is left out here only because Inductor takes about two minutes to compile its
autograd.Function on this 2-core CPU; it compiled with fullgraph=True and matched eager when tried by hand.
"""

import pytest
import torch

import fastkd
from helpers import randn

CASES = {
    "affinity_full": (lambda: fastkd.PairwiseAffinityLoss(), 5),
    "affinity_window": (lambda: fastkd.PairwiseAffinityLoss(patch=2, window=1), 5),
    "affinity_distillation": (lambda: fastkd.AffinityDistillationLoss(), 5),
    "probability": (lambda: fastkd.ProbabilityLoss(), 8),
    "pixelwise_kd": (lambda: fastkd.PixelwiseKDLoss(temperature=2.0), 8),
}


@pytest.mark.parametrize("name", CASES)
def test_compiles_without_graph_break_and_matches_eager(name, gen):
    make_loss, teacher_channels = CASES[name]
    loss = make_loss()
    s = randn((2, 8, 12, 10), gen).requires_grad_()
    t = randn((2, teacher_channels, 12, 10), gen)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: loss(a, b), fullgraph=True)
    value = compiled(s, t)
    (grad,) = torch.autograd.grad(value, s)
    expected = loss(s, t)
    (expected_grad,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6 * expected_grad.abs().max().item())
