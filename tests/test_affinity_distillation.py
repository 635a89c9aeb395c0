"""AffinityDistillationLoss against the literal float64 reference."""

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd import reference
from fastkd.ops import affinity_distillation as op
from helpers import DTYPES, as_layout, compare_with_reference, randn
from test_pairwise_affinity import LargestTensor, assert_relative_error_below, near_converged_pair

SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 40, 24, 3, 3), (2, 2, 2, 1, 3)]  # B, Cs, Ct, H, W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", [dict(), dict(reduction="sum"), dict(eps=1e-2)], ids=str)
def test_matches_reference(config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    inputs = [randn((batch, cs, height, width), gen, dtype), randn((batch, ct, height, width), gen, dtype)]
    compare_with_reference(F.affinity_distillation_loss, reference.affinity_distillation_loss, inputs, **config)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_memory_layouts(layout, gen):
    s, t = randn((2, 6, 9, 7), gen), randn((2, 3, 9, 7), gen)
    compare_with_reference(F.affinity_distillation_loss, reference.affinity_distillation_loss,
                           [as_layout(s, layout), as_layout(t, layout)])


def test_gradient_reaches_both_inputs_when_both_require_grad(gen):
    inputs = [randn((2, 4, 5, 6), gen, torch.float64), randn((2, 7, 5, 6), gen, torch.float64)]
    compare_with_reference(F.affinity_distillation_loss, reference.affinity_distillation_loss, inputs,
                           grad_inputs=(0, 1))


def test_gradcheck(gen):
    s = randn((2, 3, 4, 5), gen, torch.float64).requires_grad_()
    t = randn((2, 5, 4, 5), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(F.affinity_distillation_loss, (s, t))


@pytest.mark.parametrize("cs,ct,m", [(4, 6, 5), (3, 3, 40), (64, 48, 9)])
def test_gram_and_direct_row_norms_agree(cs, ct, m, gen):
    s_hat = torch.nn.functional.normalize(randn((2, cs, m), gen, torch.float64), dim=1)
    t_hat = torch.nn.functional.normalize(randn((2, ct, m), gen, torch.float64), dim=1)
    torch.testing.assert_close(op.row_difference_squares(s_hat, t_hat, gram=True),
                               op.row_difference_squares(s_hat, t_hat, gram=False), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 64, 2, 2)], ids=str)  # Gram path, direct path
def test_identical_rows_give_zero_loss_and_zero_gradient(shape, gen):
    s = randn(shape, gen, torch.float64)
    t = s.clone()
    t[0] += randn(shape[1:], gen, torch.float64)  # image 0 differs, image 1 is identical
    s.requires_grad_()
    loss = F.affinity_distillation_loss(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    same = s.detach().clone().requires_grad_()
    zero = F.affinity_distillation_loss(same, same.detach())
    zero.backward()
    assert zero.item() == 0 and torch.equal(same.grad, torch.zeros_like(same.grad))


def test_near_convergence_float32(gen):
    s, t = near_converged_pair((2, 48, 64, 64), gen)
    assert_relative_error_below(F.affinity_distillation_loss, reference.affinity_distillation_loss, s, t, 1e-4)


def test_near_convergence_float32_m16384(gen):
    s, t = near_converged_pair((1, 32, 128, 128), gen)
    assert_relative_error_below(F.affinity_distillation_loss, reference.affinity_distillation_loss, s, t, 1e-4)


def test_no_m_by_m_tensor_in_forward_or_backward(gen):
    s, t = randn((2, 8, 64, 64), gen).requires_grad_(), randn((2, 11, 64, 64), gen)
    with LargestTensor() as recorder:
        F.affinity_distillation_loss(s, t).backward()
    assert recorder.largest <= 2 * 11 * 64 * 64


def test_module_matches_function(gen):
    s, t = randn((2, 4, 5, 6), gen), randn((2, 3, 5, 6), gen)
    assert torch.equal(fastkd.AffinityDistillationLoss(reduction="sum")(s, t),
                       F.affinity_distillation_loss(s, t, reduction="sum"))
