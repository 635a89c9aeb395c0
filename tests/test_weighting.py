"""The magnitude rule (Xie et al. sec. 4.1) and the weighted sum of terms (fastkd/weighting.py)."""

import math

import pytest
import torch

import fastkd
from fastkd import magnitude_weights, weighted_sum


def test_each_term_starts_at_the_task_loss(gen):
    ce = (torch.rand(5, generator=gen, dtype=torch.float64) + 1).tolist()
    terms = {"consistency": [v * 90 for v in torch.rand(5, generator=gen).add(1).tolist()],
             "pixel": torch.rand(5, generator=gen).add(0.01)}
    weights = magnitude_weights(ce, terms)
    for name, values in terms.items():
        values = values.tolist() if isinstance(values, torch.Tensor) else values
        assert weights[name] * math.fsum(values) / 5 == pytest.approx(math.fsum(ce) / 5, rel=1e-6)
    doubled = magnitude_weights(ce, terms, ratio=2.0)
    assert all(doubled[name] == pytest.approx(2 * weights[name]) for name in terms)


def test_accepts_numbers_tensors_and_lists_of_tensors():
    one = magnitude_weights(2.0, {"a": 0.5})
    assert one == {"a": 4.0}
    assert magnitude_weights(torch.tensor(2.0), {"a": [torch.tensor(0.5)]}) == one
    assert magnitude_weights([torch.tensor(1.0), torch.tensor(3.0)], {"a": torch.tensor([0.25, 0.75])}) == one
    assert fastkd.magnitude_weights is magnitude_weights


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_refuses_a_term_without_a_magnitude(value):
    with pytest.raises(ValueError, match=r"`terms\['holistic'\]` has mean"):
        magnitude_weights([1.0, 1.0], {"pixel": [1.0, 2.0], "holistic": [value, value]})
    with pytest.raises(ValueError, match="`task_loss` has mean"):
        magnitude_weights([value], {"pixel": [1.0]})


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"`terms\['pixel'\]` has 1 value\(s\) but `task_loss` has 2"):
        magnitude_weights([1.0, 2.0], {"pixel": [1.0]})
    with pytest.raises(TypeError, match="`terms` must be a non-empty mapping"):
        magnitude_weights(1.0, {})
    with pytest.raises(TypeError, match="`task_loss` must hold at least one real number"):
        magnitude_weights([], {"pixel": [1.0]})
    with pytest.raises(TypeError, match="`task_loss` must be a number"):
        magnitude_weights("1", {"pixel": [1.0]})
    with pytest.raises(ValueError, match="`ratio`"):
        magnitude_weights(1.0, {"pixel": 1.0}, ratio=0)


def test_weighted_sum(gen):
    terms = {"ce": torch.rand((), generator=gen, requires_grad=True),
             "pixel": torch.rand((), generator=gen, requires_grad=True)}
    total, weighted = weighted_sum(terms, {"ce": 1.0, "pixel": 10.0, "unused": 3.0})
    assert list(weighted) == ["ce", "pixel"]
    assert torch.equal(weighted["pixel"], 10.0 * terms["pixel"])
    assert torch.equal(total, terms["ce"] + 10.0 * terms["pixel"])
    total.backward()
    assert terms["pixel"].grad.item() == 10.0
    with pytest.raises(ValueError, match="no weight for 'pixel'"):
        weighted_sum(terms, {"ce": 1.0})
    with pytest.raises(ValueError, match="`terms` is empty"):
        weighted_sum({}, {"ce": 1.0})
