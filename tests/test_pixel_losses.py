"""ProbabilityLoss and PixelwiseKDLoss against the literal float64 reference."""

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd import reference
from helpers import DTYPES, as_layout, compare_with_reference, randn

LOSSES = {
    "probability": (F.probability_loss, reference.probability_loss, fastkd.ProbabilityLoss),
    "pixelwise_kd": (F.pixelwise_kd_loss, reference.pixelwise_kd_loss, fastkd.PixelwiseKDLoss),
}
CONFIGS = {
    "probability": [dict(), dict(reduction="sum")],
    "pixelwise_kd": [dict(), dict(temperature=4.0), dict(temperature=0.5, reduction="sum")],
}
CASES = [(name, config) for name in LOSSES for config in CONFIGS[name]]


def logits(shape, gen, dtype=torch.float32):
    return randn(shape, gen, dtype, scale=3.0), randn(shape, gen, dtype, scale=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 19, 7, 13), (3, 2, 4, 5), (2, 5, 1, 1)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name,config", CASES, ids=str)
def test_matches_reference(name, config, masked, shape, dtype, gen):
    loss_fn, reference_fn, _ = LOSSES[name]
    mask = torch.rand(shape[0], *shape[2:], generator=gen) > 0.3 if masked else None
    compare_with_reference(lambda s, t: loss_fn(s, t, mask, **config),
                           lambda s, t: reference_fn(s, t, mask, **config), logits(shape, gen, dtype), dtype=dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("name", LOSSES)
def test_memory_layouts(name, layout, gen):
    loss_fn, reference_fn, _ = LOSSES[name]
    s, t = logits((2, 6, 9, 7), gen)
    compare_with_reference(loss_fn, reference_fn, [as_layout(s, layout), as_layout(t, layout)], grad_inputs=(0, 1))


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(name, gen):
    loss_fn, _, _ = LOSSES[name]
    s, t = logits((2, 4, 3, 5), gen, torch.float64)
    mask = torch.rand(2, 3, 5, generator=gen) > 0.5
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b, mask), (s.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("name", LOSSES)
def test_uncounted_pixels_are_ignored_even_when_nan(name, gen):
    loss_fn, _, _ = LOSSES[name]
    s, t = logits((2, 4, 3, 5), gen)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[1, 2, 4] = False
    poisoned = s.clone()
    poisoned[1, :, 2, 4] = float("nan")
    assert torch.equal(loss_fn(poisoned, t, mask), loss_fn(s, t, mask))
    assert loss_fn(s, t, torch.zeros_like(mask)).item() == 0  # no counted pixel: 0


@pytest.mark.parametrize("name", LOSSES)
def test_module_matches_function(name, gen):
    loss_fn, _, module = LOSSES[name]
    s, t = logits((2, 4, 3, 5), gen)
    mask = torch.rand(2, 3, 5, generator=gen) > 0.5
    assert torch.equal(module(reduction="sum")(s, t, mask), loss_fn(s, t, mask, reduction="sum"))


def test_kd_is_zero_for_identical_logits_and_scales_with_t_squared(gen):
    s, t = logits((2, 4, 3, 5), gen, torch.float64)
    assert F.pixelwise_kd_loss(s, s).abs().item() < 1e-15
    # T^2 KL at T -> large behaves like the squared logit distance, independent of T: finite and positive
    assert 0 < F.pixelwise_kd_loss(s, t, temperature=100.0).item() < float("inf")
