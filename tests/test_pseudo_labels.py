"""Pseudo-labels (FORMULAS.md section 8) against the per-pixel float64 reference, threshold edge cases and
every refused input."""

import math

import pytest
import torch
from helpers import DTYPES, as_layout, randn

from fastkd.unlabelled import pseudo_labels
from fastkd.reference.unlabelled import pseudo_labels as ref_pseudo_labels


def _assert_labels_equal(labels, t_logits, threshold, ignore_index):
    """``labels`` equal the reference wherever the confidence is not within float32 rounding of the threshold
    (the implementation computes the softmax in float32 for float32 and lower inputs)."""
    expected = ref_pseudo_labels(t_logits, threshold, ignore_index)
    confidence = torch.softmax(t_logits.to(torch.float64), dim=1).amax(dim=1)
    decided = (confidence - threshold).abs() > 1e-6
    assert labels.shape == expected.shape and labels.dtype == torch.long
    assert torch.equal(labels[decided], expected[decided])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(3, 5, 7, 13), (1, 4, 4, 4)])
def test_matches_reference(gen, dtype, threshold, shape):
    t_logits = randn(shape, gen, dtype, scale=2.0)
    labels = pseudo_labels(t_logits, threshold=threshold, ignore_index=255)
    _assert_labels_equal(labels, t_logits, threshold, 255)
    if threshold == 0.0:
        assert (labels != 255).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_layouts(gen, layout):
    t_logits = randn((2, 6, 7, 13), gen, scale=2.0)
    labels = pseudo_labels(as_layout(t_logits, layout), threshold=0.5, ignore_index=-1)
    _assert_labels_equal(labels, t_logits, 0.5, -1)
    assert torch.equal(labels, pseudo_labels(t_logits, threshold=0.5, ignore_index=-1))


def test_default_arguments(gen):
    t_logits = randn((2, 3, 5, 6), gen, scale=3.0)
    _assert_labels_equal(pseudo_labels(t_logits), t_logits, 0.7, 255)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_threshold_is_inclusive_and_ties_take_the_first_class(dtype):
    # Equal logits: confidence exactly 1/C, argmax the first class.
    two = torch.zeros(1, 2, 1, 3, dtype=dtype)
    assert pseudo_labels(two, threshold=0.5).tolist() == [[[0, 0, 0]]]
    assert pseudo_labels(two, threshold=math.nextafter(0.5, 1.0)).tolist() == [[[255, 255, 255]]]
    four = torch.zeros(2, 4, 3, 2, dtype=dtype)
    four[:, 2] = 1.0
    four[:, 3] = 1.0  # classes 2 and 3 tie for the maximum
    assert (pseudo_labels(four, threshold=0.0) == 2).all()
    assert torch.equal(ref_pseudo_labels(four, 0.0, 255), pseudo_labels(four, threshold=0.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_threshold_one_keeps_only_certain_pixels(dtype):
    t_logits = torch.zeros(1, 3, 1, 2, dtype=dtype)
    t_logits[0, 1, 0, 0] = 200.0  # the other classes' probabilities underflow: confidence is exactly 1
    t_logits[0, 2, 0, 1] = 5.0
    assert pseudo_labels(t_logits, threshold=1.0).tolist() == [[[1, 255]]]
    assert pseudo_labels(t_logits, threshold=0.9).tolist() == [[[1, 2]]]
    assert torch.equal(ref_pseudo_labels(t_logits, 1.0, 255), pseudo_labels(t_logits, threshold=1.0))


def test_single_class_is_always_confident(gen):
    t_logits = randn((2, 1, 3, 4), gen)
    assert (pseudo_labels(t_logits, threshold=1.0) == 0).all()


def test_large_logits_do_not_overflow(gen):
    t_logits = randn((2, 3, 4, 5), gen, torch.float16, scale=2.0) * 3000  # up to the float16 range
    _assert_labels_equal(pseudo_labels(t_logits, threshold=0.9), t_logits, 0.9, 255)


def test_negative_ignore_index(gen):
    t_logits = randn((2, 3, 4, 5), gen, scale=2.0)
    labels = pseudo_labels(t_logits, threshold=0.8, ignore_index=-100)
    _assert_labels_equal(labels, t_logits, 0.8, -100)
    assert set(labels.unique().tolist()) <= {-100, 0, 1, 2}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_pixel_is_ignored(gen, bad):
    t_logits = randn((2, 3, 4, 5), gen)
    t_logits[1, 0, 2, 3] = bad
    labels = pseudo_labels(t_logits, threshold=0.0)
    assert labels[1, 2, 3] == 255
    assert (labels != 255).sum() == 2 * 4 * 5 - 1
    assert torch.equal(labels, ref_pseudo_labels(t_logits, 0.0, 255))


def test_no_gradient_and_output_properties(gen):
    t_logits = randn((2, 3, 4, 5), gen).requires_grad_(True)
    labels = pseudo_labels(t_logits)
    assert not labels.requires_grad and labels.grad_fn is None
    assert labels.dtype == torch.long and labels.shape == (2, 4, 5) and labels.device == t_logits.device


def test_empty_batch():
    labels = pseudo_labels(torch.zeros(0, 3, 4, 5))
    assert labels.shape == (0, 4, 5) and labels.dtype == torch.long


@pytest.mark.parametrize("ignore_index", [0, 2, 4])
def test_refuses_ignore_index_that_is_a_class(ignore_index):
    with pytest.raises(ValueError, match=f"`ignore_index`={ignore_index} is a valid class index for C=5"):
        pseudo_labels(torch.zeros(1, 5, 2, 2), ignore_index=ignore_index)
    assert (pseudo_labels(torch.zeros(1, 5, 2, 2), threshold=0.0, ignore_index=5) == 0).all()


@pytest.mark.parametrize("value", [2.0, True, "255", None])
def test_refuses_non_int_ignore_index(value):
    with pytest.raises(TypeError, match="`ignore_index` must be an int"):
        pseudo_labels(torch.zeros(1, 3, 2, 2), ignore_index=value)


@pytest.mark.parametrize(
    "value,error", [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                    ("0.7", TypeError), (True, TypeError), (None, TypeError)],
)
def test_refuses_bad_threshold(value, error):
    with pytest.raises(error, match="`threshold`"):
        pseudo_labels(torch.zeros(1, 3, 2, 2), threshold=value)


def test_refuses_bad_logits():
    with pytest.raises(TypeError, match="`t_logits` has dtype torch.int64"):
        pseudo_labels(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="`t_logits` has dtype torch.bool"):
        pseudo_labels(torch.zeros(1, 3, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="`t_logits` must have 4 dimensions"):
        pseudo_labels(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="`t_logits` has no channels"):
        pseudo_labels(torch.zeros(1, 0, 2, 2))
    with pytest.raises(TypeError, match="`t_logits` must be a torch.Tensor"):
        pseudo_labels([[0.0]])
