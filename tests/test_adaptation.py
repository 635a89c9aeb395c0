"""Knowledge adaptation (FORMULAS.md section 6): AdaptationLoss against the literal float64 reference,
the autoencoder's shapes and loss, the adapter, and every refused input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, as_layout, assert_close, compare_with_reference, randn

from fastkd.adaptation import AdaptationLoss, FeatureAdapter, FeatureAutoencoder, adaptation_loss
from fastkd.reference.adaptation import adaptation_loss as ref_adaptation_loss
from fastkd.reference.adaptation import autoencoder_loss as ref_autoencoder_loss

INF = float("inf")
NORM_ORDERS = [(1, 2), (2, 2), (1.5, 3), (INF, 1), (1, INF)]


def _pair(shape, gen, dtype):
    return randn(shape, gen, dtype), randn(shape, gen, dtype)


# ----------------------------------------------------------------------------------------- AdaptationLoss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,q", NORM_ORDERS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 13), (1, 4, 5, 6)])
def test_matches_reference_forward_and_gradient(gen, dtype, p, q, shape):
    s, t = _pair(shape, gen, dtype)
    compare_with_reference(adaptation_loss, ref_adaptation_loss, [s, t], grad_inputs=(0, 1), p=p, q=q)


@pytest.mark.parametrize("layout_s", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("layout_t", ["contiguous", "channels_last", "strided"])
def test_layouts(gen, layout_s, layout_t):
    s, t = _pair((2, 6, 7, 13), gen, torch.float32)
    s = as_layout(s, layout_s).requires_grad_(True)
    t = as_layout(t, layout_t)
    loss = adaptation_loss(s, t, p=2, q=2)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    expected = ref_adaptation_loss(s64, t, 2, 2, 1e-8)
    (ref_grad,) = torch.autograd.grad(expected, s64)
    assert_close(loss, expected, torch.float32)
    assert_close(grad, ref_grad, torch.float32, scale=2)


@pytest.mark.parametrize("p,q", NORM_ORDERS)
def test_gradcheck(gen, p, q):
    s, t = _pair((2, 3, 3, 4), gen, torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: adaptation_loss(a, b, p=p, q=q), (s, t))


@pytest.mark.parametrize("p,q", NORM_ORDERS)
def test_channel_invariant_matches_reference(gen, p, q):
    s, t = _pair((2, 5, 3, 4), gen, torch.float64)
    compare_with_reference(adaptation_loss, ref_adaptation_loss, [s, t], grad_inputs=(0,), p=p, q=q,
                           channel_invariant=True)


@pytest.mark.parametrize("channels", [4, 64, 1024])
def test_channel_invariant_scale_does_not_grow_with_channels(gen, channels):
    # Unrelated directions: p=1, q=2 gives about sqrt(4C/pi) per position, sqrt(4/pi) once divided by sqrt(C).
    s, t = _pair((2, channels, 8, 8), gen, torch.float64)
    plain = adaptation_loss(s, t).item()
    invariant = adaptation_loss(s, t, channel_invariant=True).item()
    assert invariant == pytest.approx(plain / math.sqrt(channels), rel=1e-12)
    assert invariant == pytest.approx(math.sqrt(4 / math.pi), rel=0.1)
    # p >= q: the p-norm of a unit q-norm vector is at most 1 whatever C, so nothing is divided
    assert adaptation_loss(s, t, p=2, q=2, channel_invariant=True).item() == adaptation_loss(s, t, p=2, q=2).item()


def test_the_code_is_in_the_adapters_range(gen):
    """The code is non-negative (BN + ReLU after the last encoder conv), as the adapter's ReLU output is, so
    the adapter can match it. Against a signed code (the raw output of a conv) the best any non-negative
    output can do, its ReLU, leaves a floor: that made students collapse."""
    ae = FeatureAutoencoder(6, 5).train()
    code = ae.encode(randn((3, 6, 9, 7), gen)).detach()
    assert code.min() >= 0 and (code > 0).float().mean() > 0.2
    signed = ae.encoder[:-2](randn((3, 6, 9, 7), gen)).detach()  # the code without its last BN + ReLU
    assert (signed < 0).float().mean() > 0.2
    assert adaptation_loss(torch.relu(signed), signed).item() > 0.3


def test_module_equals_functional(gen):
    s, t = _pair((2, 4, 5, 7), gen, torch.float64)
    module = AdaptationLoss(p=3, q=1.5, eps=1e-3)
    assert torch.equal(module(s, t), adaptation_loss(s, t, p=3, q=1.5, eps=1e-3))
    assert "p=3.0" in repr(module) and "q=1.5" in repr(module) and "channel_invariant=False" in repr(module)
    module = AdaptationLoss(channel_invariant=True)
    assert torch.equal(module(s, t), adaptation_loss(s, t, channel_invariant=True))


def test_only_the_direction_matters(gen):
    # Each position's vector is divided by its q-norm, so positive per-position rescaling changes nothing.
    s, t = _pair((2, 4, 5, 7), gen, torch.float64)
    scale = torch.rand(2, 1, 5, 7, generator=gen, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(adaptation_loss(s * scale, t, eps=1e-12), adaptation_loss(s, t, eps=1e-12))


def test_identical_inputs_give_zero_and_zero_gradient(gen):
    s = randn((2, 4, 5, 7), gen, torch.float64).requires_grad_(True)
    for p, q in NORM_ORDERS:
        loss = adaptation_loss(s, s.detach(), p=p, q=q)
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0
        assert torch.all(grad == 0)


@pytest.mark.parametrize(
    "s_dtype,t_dtype,expected",
    [(torch.float16, torch.float32, torch.float32), (torch.bfloat16, torch.float16, torch.float32),
     (torch.float16, torch.float16, torch.float32), (torch.float64, torch.bfloat16, torch.float64)],
)
def test_result_dtype_is_promoted_and_at_least_float32(gen, s_dtype, t_dtype, expected):
    s = randn((2, 3, 4, 5), gen, s_dtype).requires_grad_(True)
    t = randn((2, 3, 4, 5), gen, t_dtype).requires_grad_(True)
    loss = adaptation_loss(s, t)
    assert loss.dtype == expected
    assert_close(loss, ref_adaptation_loss(s, t, 1, 2, 1e-8), torch.float32)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert grad_s.dtype == s_dtype and grad_t.dtype == t_dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch_gives_zero(dtype):
    s = torch.zeros(0, 4, 5, 7, dtype=dtype, requires_grad=True)
    loss = AdaptationLoss()(s, torch.zeros(0, 4, 5, 7, dtype=dtype))
    assert loss.item() == 0 and loss.dtype == torch.promote_types(dtype, torch.float32)
    loss.backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("p,q", NORM_ORDERS)
def test_nan_or_inf_input_gives_nan(gen, bad, p, q):
    s, t = _pair((2, 3, 4, 5), gen, torch.float32)
    t[1, 2, 3, 1] = bad
    assert torch.isnan(adaptation_loss(s, t, p=p, q=q))
    assert torch.isnan(adaptation_loss(t, s, p=p, q=q))


@pytest.mark.parametrize(
    "s_shape,t_shape,match",
    [
        ((2, 3, 4, 5), (3, 3, 4, 5), "batch sizes differ.*`adapted_s` has 2, `encoded_t` has 3"),
        ((2, 3, 4, 5), (2, 3, 4, 6), "spatial sizes differ.*`adapted_s` is 4x5.*resize"),
        ((2, 3, 4, 5), (2, 4, 4, 5), "channel counts differ.*`adapted_s` has 3, `encoded_t` has 4.*Adapter"),
        ((3, 4, 5), (2, 3, 4, 5), "`adapted_s` must have 4 dimensions"),
        ((2, 3, 4, 5), (2, 3, 4, 5, 1), "`encoded_t` must have 4 dimensions"),
        ((1, 0, 3, 3), (1, 0, 3, 3), "`adapted_s` has no channels"),
    ],
)
def test_refuses_mismatched_shapes(s_shape, t_shape, match):
    with pytest.raises(ValueError, match=match):
        adaptation_loss(torch.zeros(s_shape), torch.zeros(t_shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_refuses_integer_and_bool_dtypes(dtype):
    good = torch.zeros(2, 3, 4, 5)
    bad = torch.zeros(2, 3, 4, 5, dtype=dtype)
    with pytest.raises(TypeError, match="`adapted_s` has dtype"):
        adaptation_loss(bad, good)
    with pytest.raises(TypeError, match="`encoded_t` has dtype"):
        AdaptationLoss()(good, bad)


def test_refuses_non_tensor_and_different_devices():
    with pytest.raises(TypeError, match="`encoded_t` must be a torch.Tensor"):
        adaptation_loss(torch.zeros(1, 2, 3, 3), [[0.0]])
    with pytest.raises(ValueError, match="`adapted_s` is on cpu but `encoded_t` is on meta"):
        adaptation_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, device="meta"))


@pytest.mark.parametrize("name", ["p", "q"])
@pytest.mark.parametrize(
    "value,error", [(0.5, ValueError), (0, ValueError), (-1, ValueError), (math.nan, ValueError),
                    (True, TypeError), ("2", TypeError), (None, TypeError)],
)
def test_refuses_bad_norm_orders(name, value, error):
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(error, match=f"`{name}`"):
        AdaptationLoss(**{name: value})
    with pytest.raises(error, match=f"`{name}`"):
        adaptation_loss(x, x, **{name: value})


@pytest.mark.parametrize(
    "value,error", [(0, ValueError), (-1e-8, ValueError), (math.inf, ValueError), (math.nan, ValueError),
                    ("1e-8", TypeError)],
)
def test_refuses_bad_eps(value, error):
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(error, match="`eps`"):
        AdaptationLoss(eps=value)
    with pytest.raises(error, match="`eps`"):
        adaptation_loss(x, x, eps=value)


# ----------------------------------------------------------------------------------------- FeatureAutoencoder


def _encoded_size(size, strides):
    for stride in strides:
        size = (size - 1) // stride + 1
    return size


@pytest.mark.parametrize("strides", [(1, 1, 2), (2, 2, 2), (3, 1, 2), (1, 1, 1), (2, 3, 4)])
@pytest.mark.parametrize("size", [(7, 13), (1, 1), (2, 3), (16, 16), (9, 10)])
def test_autoencoder_restores_exact_size(gen, strides, size):
    ae = FeatureAutoencoder(4, 3, strides=strides)
    x = randn((2, 4) + size, gen)
    z = ae.encode(x)
    assert z.shape == (2, 3, _encoded_size(size[0], strides), _encoded_size(size[1], strides))
    assert ae.decode(z, size).shape == x.shape
    assert ae(x).shape == x.shape


def test_autoencoder_architecture():
    ae = FeatureAutoencoder(6, 4, strides=(1, 2, 3))
    convs = [m for m in ae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (3, 3)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(6, 4), (4, 4), (4, 4)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    # BN + ReLU after every conv, the last included: the code is non-negative like the adapter's output
    assert [type(m).__name__ for m in ae.encoder] == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    assert [d.stride for d in ae.deconvs] == [(3, 3), (2, 2), (1, 1)]
    assert [(d.in_channels, d.out_channels) for d in ae.deconvs] == [(4, 4), (4, 4), (4, 6)]
    assert all(d.kernel_size == (3, 3) and d.padding == (1, 1) for d in ae.deconvs)
    assert len(ae.decoder_activations) == 2


@pytest.mark.parametrize("l1_weight", [1e-7, 0.0, 0.5])
@pytest.mark.parametrize("shape", [(3, 5, 7, 13), (1, 5, 5, 6)])  # batch 1: a code of 2x2, BN needs > 1 value
def test_autoencoder_loss_matches_literal_formula(gen, l1_weight, shape):
    ae = FeatureAutoencoder(5, 3, strides=(1, 2, 2)).double()
    phi = randn(shape, gen, torch.float64).requires_grad_(True)
    loss = ae.loss(phi, l1_weight=l1_weight)
    grads = torch.autograd.grad(loss, [phi] + list(ae.parameters()))
    expected = ref_autoencoder_loss(phi, ae.encode, ae.decode, l1_weight)
    ref_grads = torch.autograd.grad(expected, [phi] + list(ae.parameters()))
    assert_close(loss, expected, torch.float64)
    # One comparison over all parameters: the gradients of the conv biases that feed a BatchNorm are 0 in
    # exact arithmetic, rounding noise here.
    assert_close(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads]),
                 torch.float64, scale=2)


def test_autoencoder_loss_l1_term(gen):
    ae = FeatureAutoencoder(3, 2).double().eval()
    phi = randn((2, 3, 5, 6), gen, torch.float64)
    difference = ae.loss(phi, l1_weight=2.0) - ae.loss(phi, l1_weight=0.0)
    torch.testing.assert_close(difference, 2.0 * ae.encode(phi).abs().mean())


def test_autoencoder_loss_float32_and_empty_batch(gen):
    ae = FeatureAutoencoder(3, 2)
    phi = randn((2, 3, 5, 6), gen)
    loss = ae.loss(phi)
    assert loss.dtype == torch.float32 and loss.shape == ()
    empty = ae.loss(torch.zeros(0, 3, 5, 6))
    assert empty.item() == 0
    empty.backward()


def test_autoencoder_refusals():
    with pytest.raises(ValueError, match="`in_channels` must be >= 1"):
        FeatureAutoencoder(0, 3)
    with pytest.raises(TypeError, match="`latent_channels` must be an int"):
        FeatureAutoencoder(3, 2.5)
    with pytest.raises(TypeError, match="`strides` must be a sequence of three ints"):
        FeatureAutoencoder(3, 2, strides=(1, 2))
    with pytest.raises(ValueError, match=r"`strides\[1\]` must be >= 1"):
        FeatureAutoencoder(3, 2, strides=(1, 0, 2))
    ae = FeatureAutoencoder(3, 2)
    with pytest.raises(ValueError, match="`phi_t` must have 3 channels"):
        ae.loss(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="`phi_t` must have 4 dimensions"):
        ae.loss(torch.zeros(3, 5, 5))
    with pytest.raises(TypeError, match="`phi_t` has dtype torch.int64"):
        ae.loss(torch.zeros(1, 3, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="`l1_weight` must be finite and >= 0"):
        ae.loss(torch.zeros(1, 3, 5, 5), l1_weight=-1.0)
    with pytest.raises(ValueError, match="`l1_weight` must be finite and >= 0"):
        ae.loss(torch.zeros(1, 3, 5, 5), l1_weight=math.inf)
    with pytest.raises(TypeError, match="`l1_weight` must be a real number"):
        ae.loss(torch.zeros(1, 3, 5, 5), l1_weight="1e-7")
    with pytest.raises(ValueError, match="`x` must have 3 channels"):
        ae(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="`z` is 3x3 but encoding a map of `output_size` 9x9 gives 5x5"):
        ae.decode(torch.zeros(1, 2, 3, 3), (9, 9))
    with pytest.raises(TypeError, match="`output_size` must be a pair of ints"):
        ae.decode(torch.zeros(1, 2, 3, 3), 5)
    with pytest.raises(ValueError, match="`z` must have 2 channels"):
        ae.decode(torch.zeros(1, 3, 3, 3), (5, 5))


# ----------------------------------------------------------------------------------------- FeatureAdapter


def test_adapter_is_conv_bn_relu(gen):
    adapter = FeatureAdapter(5, 3).double()
    conv, bn, relu = adapter
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    x = randn((2, 5, 7, 13), gen, torch.float64)
    adapter.train()
    adapter(x)  # moves the running statistics away from their initial values
    adapter.eval()
    literal = F.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), bn.running_mean,
                                  bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps))
    out = adapter(x)
    assert out.shape == (2, 3, 7, 13)
    torch.testing.assert_close(out, literal)


def test_adapter_refusals():
    with pytest.raises(ValueError, match="`out_channels` must be >= 1"):
        FeatureAdapter(3, 0)
    with pytest.raises(TypeError, match="`in_channels` must be an int"):
        FeatureAdapter("3", 2)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_refuses_non_bool_channel_invariant(value):
    with pytest.raises(TypeError, match="`channel_invariant` must be a bool"):
        AdaptationLoss(channel_invariant=value)
    with pytest.raises(TypeError, match="`channel_invariant` must be a bool"):
        adaptation_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), channel_invariant=value)
