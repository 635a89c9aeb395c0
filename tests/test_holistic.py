"""Holistic distillation (FORMULAS.md section 7): the discriminator's architecture and input checks, and the
WGAN-GP losses against the literal per-sample reference given the same interpolation weights u."""

import copy
import math

import pytest
import torch
from helpers import as_layout, assert_close, randn
from torch.nn.utils import parametrize

from fastkd.holistic import HolisticDiscriminator, SelfAttention, holistic_d_loss, holistic_g_loss
from fastkd.reference.holistic import holistic_d_loss as ref_holistic_d_loss
from fastkd.reference.holistic import holistic_g_loss as ref_holistic_g_loss
from fastkd.reference.holistic import self_attention as ref_self_attention

CLASSES = 5


def _build(gen, image_channels=3, blocks=3, attention=2, base_channels=8):
    """A fresh discriminator whose initial weights come from ``gen`` (the global RNG is left untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        return HolisticDiscriminator(CLASSES, image_channels=image_channels, base_channels=base_channels,
                                     blocks=blocks, attention=attention)


def _discriminator(gen, image_channels=3, dtype=torch.float64):
    """A small discriminator in eval mode (running BN statistics, no power iteration), so that its score of
    a sample does not depend on the rest of the batch, with nonzero attention gammas."""
    D = _build(gen, image_channels).to(dtype).eval()
    for module in D.modules():
        if isinstance(module, SelfAttention):
            module.gamma.data.fill_(0.7)
    return D


def _copied_generator(gen):
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    return twin


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def _inputs(gen, batch, size, dtype, image_channels=3):
    fake = randn((batch, CLASSES) + size, gen, dtype)
    real = randn((batch, CLASSES) + size, gen, dtype)
    image = randn((batch, image_channels) + size, gen, dtype) if image_channels else None
    return fake, real, image


# ----------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("image_channels", [3, 0])
@pytest.mark.parametrize("batch,size", [(1, (8, 8)), (3, (17, 19)), (2, (9, 32))])
def test_score_shape(gen, image_channels, batch, size):
    D = HolisticDiscriminator(CLASSES, image_channels=image_channels, base_channels=4, blocks=3)
    seg = randn((batch, CLASSES) + size, gen)
    image = randn((batch, image_channels) + size, gen) if image_channels else None
    scores = D(seg, image)
    assert scores.shape == (batch,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("blocks,attention", [(4, 2), (3, 3), (2, 0), (1, 1)])
def test_architecture_and_gamma_starts_at_zero(blocks, attention):
    D = HolisticDiscriminator(CLASSES, image_channels=3, base_channels=6, blocks=blocks, attention=attention)
    assert isinstance(D.input_norm, torch.nn.BatchNorm2d) and D.input_norm.num_features == CLASSES + 3
    convs = [m for m in D.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [6 * 2**k for k in range(blocks)]
    for conv in convs + [D.head]:
        assert conv.kernel_size == (4, 4) and parametrize.is_parametrized(conv, "weight")
    assert all(c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert D.head.out_channels == 1 and D.head.stride == (1, 1)
    relus = [m for m in D.features if isinstance(m, torch.nn.LeakyReLU)]
    assert len(relus) == blocks and all(r.negative_slope == 0.1 for r in relus)
    attentions = [m for m in D.features if isinstance(m, SelfAttention)]
    # Attention follows each of the last `attention` blocks: it sees that block's width.
    assert [a.value.in_channels for a in attentions] == [6 * 2**k for k in range(blocks - attention, blocks)]
    for a in attentions:
        assert a.gamma.item() == 0
        assert a.query.out_channels == a.key.out_channels == max(a.value.in_channels // 8, 1)
        assert a.value.out_channels == a.value.in_channels
    assert "blocks=" in repr(D)


def test_self_attention_matches_literal_loop(gen):
    attention = SelfAttention(16).double()
    attention.gamma.data.fill_(0.3)
    x = randn((2, 16, 3, 5), gen, torch.float64)
    assert attention.query.out_channels == 2
    torch.testing.assert_close(attention(x), ref_self_attention(attention, x))
    attention.gamma.data.zero_()
    assert torch.equal(attention(x), x)


@pytest.mark.parametrize("blocks,size", [(3, (7, 13)), (3, (13, 7)), (4, (15, 40)), (1, (1, 5))])
def test_too_small_map_is_refused(blocks, size):
    D = HolisticDiscriminator(CLASSES, image_channels=0, base_channels=4, blocks=blocks, attention=1)
    minimum = 2**blocks
    with pytest.raises(ValueError, match=f"`seg` is {size[0]}x{size[1]}.*at least {minimum}x{minimum}"):
        D(torch.zeros((1, CLASSES) + size))
    assert D(torch.zeros(1, CLASSES, minimum, minimum)).shape == (1,)


def test_discriminator_refusals():
    D = HolisticDiscriminator(CLASSES, image_channels=3, base_channels=4, blocks=2)
    seg, image = torch.zeros(2, CLASSES, 8, 8), torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="`image` is required"):
        D(seg)
    with pytest.raises(ValueError, match="`image` must be None"):
        HolisticDiscriminator(CLASSES, image_channels=0, base_channels=4, blocks=2)(seg, image)
    with pytest.raises(ValueError, match="`seg` must have num_classes=5 channels"):
        D(torch.zeros(2, 4, 8, 8), image)
    with pytest.raises(ValueError, match="`image` must have image_channels=3 channels"):
        D(seg, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch sizes differ: `seg` has 2, `image` has 1"):
        D(seg, image[:1])
    with pytest.raises(ValueError, match="spatial sizes differ: `seg` is 8x8, `image` is 8x9"):
        D(seg, torch.zeros(2, 3, 8, 9))
    with pytest.raises(ValueError, match="`seg` is on cpu but `image` is on meta"):
        D(seg, torch.zeros(2, 3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="`seg` must have 4 dimensions"):
        D(seg[0], image)
    with pytest.raises(TypeError, match="`seg` has dtype torch.int64"):
        D(seg.long(), image)
    with pytest.raises(TypeError, match="`image` has dtype torch.uint8"):
        D(seg, image.to(torch.uint8))
    with pytest.raises(ValueError, match="`attention` must be <= `blocks`"):
        HolisticDiscriminator(CLASSES, blocks=2, attention=3)
    with pytest.raises(ValueError, match="`num_classes` must be >= 1"):
        HolisticDiscriminator(0)
    with pytest.raises(ValueError, match="`image_channels` must be >= 0"):
        HolisticDiscriminator(CLASSES, image_channels=-1)


# ----------------------------------------------------------------------------------------- d_loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("image_channels", [3, 0])
@pytest.mark.parametrize("batch,size", [(3, (8, 8)), (1, (9, 13))])
def test_d_loss_matches_per_sample_reference(gen, dtype, image_channels, batch, size):
    D = _discriminator(gen, image_channels, dtype=dtype)
    fake, real, image = _inputs(gen, batch, size, dtype, image_channels)
    twin = _copied_generator(gen)
    loss = holistic_d_loss(D, fake, real, image, gp_weight=10.0, generator=gen)
    grads = torch.autograd.grad(loss, list(D.parameters()))

    # The reference draws the same u and runs in float64 on a float64 copy of D.
    u = torch.rand(batch, generator=twin, dtype=dtype)
    D64 = copy.deepcopy(D).double()
    as64 = (lambda x: None if x is None else x.to(torch.float64))
    expected = ref_holistic_d_loss(D64, as64(fake), as64(real), u, as64(image), gp_weight=10.0)
    ref_grads = torch.autograd.grad(expected, list(D64.parameters()))
    assert loss.dtype == dtype and loss.shape == ()
    assert_close(loss, expected, dtype)
    # One comparison over all parameters: some gradients are exactly 0 in exact arithmetic (the key bias
    # of an attention block shifts every logit of a softmax row equally), rounding noise here.
    assert_close(_flat(grads), _flat(ref_grads), dtype, scale=2)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_d_loss_layouts(gen, layout):
    D = _discriminator(gen)
    fake, real, image = _inputs(gen, 2, (8, 11), torch.float64)
    twin = _copied_generator(gen)
    loss = holistic_d_loss(D, as_layout(fake, layout), as_layout(real, layout), as_layout(image, layout),
                           generator=gen)
    expected = holistic_d_loss(D, fake, real, image, generator=twin)
    assert_close(loss, expected, torch.float64)


def test_gradient_penalty_trains_D(gen):
    # The penalty is built with create_graph=True: its weight changes D's parameter gradients.
    D = _discriminator(gen)
    fake, real, image = _inputs(gen, 2, (8, 8), torch.float64)
    twin = _copied_generator(gen)
    with_gp = holistic_d_loss(D, fake, real, image, gp_weight=1.0, generator=gen)
    without_gp = holistic_d_loss(D, fake, real, image, gp_weight=0.0, generator=twin)
    penalty_grads = torch.autograd.grad(with_gp - without_gp, list(D.parameters()), allow_unused=True)
    assert (with_gp - without_gp).item() > 0
    assert any(g is not None and g.abs().max() > 0 for g in penalty_grads)


def test_d_loss_trains_D_and_not_the_student(gen):
    D = _build(gen, blocks=2, base_channels=4)
    student = torch.nn.Conv2d(3, CLASSES, 1)
    _, real, image = _inputs(gen, 2, (8, 8), torch.float32)
    fake = student(image)
    holistic_d_loss(D, fake, real, image).backward()
    assert student.weight.grad is None and student.bias.grad is None
    assert all(p.grad is not None for p in D.parameters())
    assert D.input_norm.weight.grad.abs().sum() > 0


def test_d_loss_in_train_mode(gen):
    D = _build(gen, blocks=2, base_channels=4)
    fake, real, image = _inputs(gen, 3, (8, 8), torch.float32)
    before = D.input_norm.running_mean.clone()
    loss = holistic_d_loss(D, fake, real, image)
    loss.backward()
    assert torch.isfinite(loss)
    assert not torch.equal(D.input_norm.running_mean, before)


def test_d_loss_draws_u_from_the_generator(gen):
    D = _discriminator(gen)
    fake, real, image = _inputs(gen, 3, (8, 8), torch.float64)
    losses = [holistic_d_loss(D, fake, real, image, generator=torch.Generator().manual_seed(seed))
              for seed in (5, 5, 6)]
    assert losses[0].item() == losses[1].item() != losses[2].item()


def test_d_loss_empty_batch_gives_zero(gen):
    D = _discriminator(gen)
    empty = torch.zeros(0, CLASSES, 8, 8, dtype=torch.float64)
    loss = holistic_d_loss(D, empty, empty, torch.zeros(0, 3, 8, 8, dtype=torch.float64))
    assert loss.item() == 0
    loss.backward()
    assert ref_holistic_d_loss(D, empty, empty, torch.zeros(0)).item() == 0


def test_d_loss_nan_input_gives_nan(gen):
    D = _discriminator(gen)
    fake, real, image = _inputs(gen, 2, (8, 8), torch.float64)
    fake[1, 2, 3, 4] = math.nan
    assert torch.isnan(holistic_d_loss(D, fake, real, image))


def test_d_loss_refusals(gen):
    D = _discriminator(gen, dtype=torch.float32)
    fake, real, image = torch.zeros(2, CLASSES, 8, 8), torch.zeros(2, CLASSES, 8, 8), torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="batch sizes differ: `fake` has 2, `real` has 1"):
        holistic_d_loss(D, fake, real[:1], image)
    with pytest.raises(ValueError, match="spatial sizes differ: `fake` is 8x8, `real` is 8x9.*resize"):
        holistic_d_loss(D, fake, torch.zeros(2, CLASSES, 8, 9), image)
    with pytest.raises(ValueError, match="channel counts differ: `fake` has 5, `real` has 4"):
        holistic_d_loss(D, fake, torch.zeros(2, 4, 8, 8), image)
    with pytest.raises(TypeError, match="`real` has dtype torch.int64"):
        holistic_d_loss(D, fake, real.long(), image)
    with pytest.raises(ValueError, match="`fake` must have 4 dimensions"):
        holistic_d_loss(D, fake[0], real, image)
    with pytest.raises(ValueError, match="`fake` is on cpu but `real` is on meta"):
        holistic_d_loss(D, fake, real.to("meta"), image)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="`gp_weight` must be finite and >= 0"):
            holistic_d_loss(D, fake, real, image, gp_weight=bad)
    with pytest.raises(TypeError, match="`gp_weight` must be a real number"):
        holistic_d_loss(D, fake, real, image, gp_weight="10")
    with pytest.raises(TypeError, match="`D` must be a callable"):
        holistic_d_loss("D", fake, real, image)
    with pytest.raises(ValueError, match="`image` is required"):
        holistic_d_loss(D, fake, real)


# ----------------------------------------------------------------------------------------- g_loss


@pytest.mark.parametrize("image_channels", [3, 0])
def test_g_loss_matches_reference_and_reaches_fake(gen, image_channels):
    D = _discriminator(gen, image_channels)
    fake, _, image = _inputs(gen, 3, (9, 8), torch.float64, image_channels)
    fake.requires_grad_(True)
    loss = holistic_g_loss(D, fake, image)
    (grad,) = torch.autograd.grad(loss, fake)
    fake64 = fake.detach().clone().requires_grad_(True)
    expected = ref_holistic_g_loss(D, fake64, image)
    (ref_grad,) = torch.autograd.grad(expected, fake64)
    assert_close(loss, expected, torch.float64)
    assert_close(grad, ref_grad, torch.float64, scale=2)
    assert grad.abs().sum() > 0


def test_g_loss_trains_the_student(gen):
    D = _build(gen, blocks=2, base_channels=4)
    student = torch.nn.Conv2d(3, CLASSES, 1)
    image = randn((2, 3, 8, 8), gen)
    loss = holistic_g_loss(D, student(image), image)
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0


def test_g_loss_empty_batch_nan_and_refusals(gen):
    D = _discriminator(gen, image_channels=0)
    assert holistic_g_loss(D, torch.zeros(0, CLASSES, 8, 8, dtype=torch.float64)).item() == 0
    nan_map = torch.zeros(1, CLASSES, 8, 8, dtype=torch.float64)
    nan_map[0, 0, 0, 0] = math.nan
    assert torch.isnan(holistic_g_loss(D, nan_map))
    with pytest.raises(TypeError, match="`fake` has dtype torch.bool"):
        holistic_g_loss(D, torch.zeros(1, CLASSES, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="`fake` must have 4 dimensions"):
        holistic_g_loss(D, torch.zeros(CLASSES, 8, 8))
    with pytest.raises(TypeError, match="`D` must be a callable"):
        holistic_g_loss(None, torch.zeros(1, CLASSES, 8, 8))
