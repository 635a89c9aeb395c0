"""FORMULAS.md's refused inputs (a ValueError or TypeError naming the argument) and accepted edge cases,
for every loss of the torch-backed ops."""

import pytest
import torch

import fastkd
from fastkd import functional as F

S = torch.zeros(2, 3, 8, 9)
T = torch.zeros(2, 4, 8, 9)

# Every loss taking a (student, teacher) pair: (name, function, same classes required).
PAIR_LOSSES = [
    ("pairwise", F.pairwise_affinity_loss, False),
    ("pairwise_window", lambda s, t: F.pairwise_affinity_loss(s, t, window=1), False),
    # a max over a patch ignores -Inf unless the whole patch is -Inf: checked explicitly
    ("pairwise_max_pool", lambda s, t: F.pairwise_affinity_loss(s, t, patch=3, pool="max"), False),
    ("affinity", F.affinity_distillation_loss, False),
    ("consistency", F.consistency_loss, False),
    ("probability", F.probability_loss, True),
    ("pixelwise_kd", F.pixelwise_kd_loss, True),
]
IDS = [name for name, _, _ in PAIR_LOSSES]


def teacher_like(s, same_channels):
    return s.clone() if same_channels else torch.zeros(s.shape[0], s.shape[1] + 1, *s.shape[2:], dtype=s.dtype)


@pytest.mark.parametrize("name,loss,same", PAIR_LOSSES, ids=IDS)
def test_refuses_bad_tensors(name, loss, same):
    t = teacher_like(S, same)
    cases = [
        ((S[0], t), ValueError, r"`s(_logits)?` must have 4 dimensions"),
        ((S, t[:, :, :, :, None]), ValueError, r"`t(_logits)?` must have 4 dimensions"),
        ((S, t[:1]), ValueError, r"batch sizes differ"),
        ((S, t[:, :, :7]), ValueError, r"spatial sizes differ: .* is 8x9, .* is 7x9; resize"),
        ((S.long(), t), TypeError, r"`s(_logits)?` has dtype torch.int64"),
        ((S, t.bool()), TypeError, r"`t(_logits)?` has dtype torch.bool"),
        ((S, t.to("meta")), ValueError, r"is on cpu but `t(_logits)?` is on meta"),
        ((S.tolist(), t), TypeError, r"must be a torch.Tensor"),
        ((S[:, :0], t), ValueError, r"has no channels"),
    ]
    if same:
        cases.append(((S, torch.zeros(2, 5, 8, 9)), ValueError, r"channel counts differ: .* has 3, .* has 5"))
    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            loss(*args)


def bad_configs():
    """(constructor, kwargs, error, pattern): each refused when the module is built and when called."""
    pairwise, affinity = fastkd.PairwiseAffinityLoss, fastkd.AffinityDistillationLoss
    consistency, probability, kd = fastkd.ConsistencyLoss, fastkd.ProbabilityLoss, fastkd.PixelwiseKDLoss
    return [
        (pairwise, dict(patch=0), ValueError, r"`patch` must be >= 1"),
        (pairwise, dict(patch=(2, -1)), ValueError, r"`patch\[1\]` must be >= 1"),
        (pairwise, dict(patch=1.5), TypeError, r"`patch` must be an int or a pair"),
        (pairwise, dict(patch=True), TypeError, r"`patch` must be an int or a pair"),
        (pairwise, dict(patch=(1, 2, 3)), TypeError, r"`patch` must be an int or a pair"),
        (pairwise, dict(window=-1), ValueError, r"`window` must be >= 0"),
        (pairwise, dict(window=1.0), TypeError, r"`window` must be an int"),
        (pairwise, dict(eps=0.0), ValueError, r"`eps` must be finite and > 0"),
        (pairwise, dict(eps=float("nan")), ValueError, r"`eps` must be finite and > 0"),
        (pairwise, dict(patch=2, pool_scale=0.5), ValueError, r"`patch` and `pool_scale` are exclusive"),
        (pairwise, dict(pool_scale=0.0), ValueError, r"`pool_scale` must be in \(0, 1\]"),
        (pairwise, dict(pool_scale=1.5), ValueError, r"`pool_scale` must be in \(0, 1\]"),
        (pairwise, dict(pool="median"), ValueError, r"`pool` must be one of \('avg', 'max'\)"),
        (pairwise, dict(reduction="none"), ValueError, r"`reduction` must be one of"),
        (pairwise, dict(detach_norm="yes"), TypeError, r"`detach_norm` must be a bool"),
        (pairwise, dict(backend="gpu"), ValueError, r"`backend` must be one of"),
        (pairwise, dict(algorithm="fast"), ValueError, r"`algorithm` must be one of \('auto', 'gram', 'direct'\)"),
        (affinity, dict(algorithm=None), ValueError, r"`algorithm` must be one of"),
        (affinity, dict(eps=-1.0), ValueError, r"`eps` must be finite and > 0"),
        (affinity, dict(reduction="max"), ValueError, r"`reduction` must be one of"),
        (consistency, dict(dilation=0), ValueError, r"`dilation` must be >= 1"),
        (consistency, dict(dilation=2.0), TypeError, r"`dilation` must be an int"),
        (consistency, dict(border="reflect"), ValueError, r"`border` must be one of \('valid', 'same'\)"),
        (probability, dict(reduction=None), ValueError, r"`reduction` must be one of"),
        (kd, dict(temperature=0), ValueError, r"`temperature` must be finite and > 0"),
        (kd, dict(temperature=float("inf")), ValueError, r"`temperature` must be finite and > 0"),
        (kd, dict(temperature="2"), TypeError, r"`temperature` must be a real number"),
        (kd, dict(backend=None), ValueError, r"`backend` must be one of"),
    ]


FUNCTIONS = {
    fastkd.PairwiseAffinityLoss: F.pairwise_affinity_loss,
    fastkd.AffinityDistillationLoss: F.affinity_distillation_loss,
    fastkd.ConsistencyLoss: F.consistency_loss,
    fastkd.ProbabilityLoss: F.probability_loss,
    fastkd.PixelwiseKDLoss: F.pixelwise_kd_loss,
}


@pytest.mark.parametrize("module,kwargs,error,pattern", bad_configs(),
                         ids=[f"{c[0].__name__}-{c[1]}" for c in bad_configs()])
def test_refuses_bad_configuration(module, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        module(**kwargs)
    with pytest.raises(error, match=pattern):
        FUNCTIONS[module](S, S.clone(), **kwargs)


@pytest.mark.parametrize("dilation,size", [(1, 2), (2, 4), (3, 6)])
def test_refuses_map_too_small_for_valid_border(dilation, size):
    tiny = torch.zeros(1, 2, size, 10)
    with pytest.raises(ValueError, match=rf"{size}x10, too small for border='valid' .* at least {2 * dilation + 1}"):
        F.consistency_loss(tiny, tiny, dilation=dilation)
    assert F.consistency_loss(tiny, tiny, dilation=dilation, border="same").item() == 0  # "same" accepts it


@pytest.mark.parametrize("loss", [F.probability_loss, F.pixelwise_kd_loss])
def test_refuses_bad_mask(loss):
    good = torch.ones(2, 8, 9, dtype=torch.bool)
    for mask, error, pattern in [
        (good[:, :7], ValueError, r"`mask` must have shape \(B, H, W\) = \(2, 8, 9\)"),
        (good[None], ValueError, r"`mask` must have shape"),
        (good.float(), TypeError, r"`mask` must have dtype torch.bool"),
        (good.to("meta"), ValueError, r"`mask` is on meta"),
        (good.tolist(), TypeError, r"`mask` must be a torch.Tensor or None"),
    ]:
        with pytest.raises(error, match=pattern):
            loss(S, S.clone(), mask)


@pytest.mark.parametrize("name,loss,same", PAIR_LOSSES, ids=IDS)
@pytest.mark.parametrize("shape", [(0, 3, 8, 9), (2, 3, 0, 9)], ids=["B=0", "H=0"])
def test_empty_input_gives_zero_and_backward_works(name, loss, same, shape):
    if name == "consistency" and shape[2] == 0:
        shape = (0,) + shape[1:2] + (8, 9)
    s = torch.zeros(shape, requires_grad=True)
    result = loss(s, teacher_like(s.detach(), same))
    assert result.dim() == 0 and result.item() == 0
    result.backward()
    assert s.grad is not None and s.grad.shape == s.shape


@pytest.mark.parametrize("name,loss,same", PAIR_LOSSES, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_input_gives_nan(name, loss, same, bad, where):
    s = torch.randn(2, 3, 8, 9)
    t = teacher_like(s, same).normal_()
    (s if where == "student" else t)[1, 0, 4, 4] = bad
    assert torch.isnan(loss(s, t))


@pytest.mark.parametrize("name,loss,same", PAIR_LOSSES, ids=IDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_precision_pair_is_accepted(name, loss, same, dtypes):
    s = torch.randn(2, 3, 8, 9).to(dtypes[0]).requires_grad_()
    t = teacher_like(s.detach(), same).normal_().to(dtypes[1])
    result = loss(s, t)
    assert result.dtype == torch.promote_types(torch.promote_types(*dtypes), torch.float32)
    result.backward()
    assert s.grad.dtype == dtypes[0] and torch.isfinite(s.grad).all()
