"""The Triton backend of ConsistencyLoss against the literal float64 reference and the torch backend.

Without a GPU the kernels run on CPU tensors under the Triton interpreter, which is slow per program: the
maps here are small, and the block-boundary cases are sized from the kernel's own block constants.
"""

import math

import pytest
import torch

import fastkd
from fastkd import reference
import helpers
from helpers import DTYPES, as_layout, assert_close, compare_with_reference, randn
from test_pairwise_affinity import assert_relative_error_below, near_converged_pair

kernels = helpers.triton_kernels("consistency")
DEVICE = helpers.TRITON_DEVICE


def triton_loss(s, t, **config):
    return fastkd.ConsistencyLoss(backend="triton", **config)(s, t)


def torch_loss(s, t, **config):
    return fastkd.ConsistencyLoss(backend="torch", **config)(s, t)


def draw(shape, gen, dtype=torch.float32):
    return randn(shape, gen, dtype).to(DEVICE)


def most_square(pixels):
    """(height, width) with height * width = pixels and height <= width as close as possible."""
    height = max(h for h in range(1, math.isqrt(pixels) + 1) if pixels % h == 0)
    return height, pixels // height


CONFIGS = [dict(), dict(border="same", reduction="sum"), dict(dilation=2, reduction="sum"),
           dict(border="same", dilation=2)]
SHAPES = [(1, 5, 3, 7, 13), (3, 4, 6, 6, 5)]  # B, Cs, Ct, H, W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference(config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    inputs = [draw((batch, cs, height, width), gen, dtype), draw((batch, ct, height, width), gen, dtype)]
    compare_with_reference(triton_loss, reference.consistency_loss, inputs, **config)


@pytest.mark.parametrize("pixel_offset", [-1, 0, 1])
@pytest.mark.parametrize("border", ["valid", "same"])
def test_pixel_block_boundaries(border, pixel_offset, gen):
    """Maps of BLOCK_P - 1, BLOCK_P and BLOCK_P + 1 pixels, two images: tiles end inside and at the map."""
    height, width = most_square(kernels.BLOCK_P + pixel_offset)
    if border == "valid" and height < 3:  # a prime pixel count: a 1-row map has no valid pixel
        height, width = 3, (kernels.BLOCK_P + pixel_offset) // 3
    inputs = [draw((2, 3, height, width), gen, torch.float64), draw((2, 2, height, width), gen, torch.float64)]
    compare_with_reference(triton_loss, reference.consistency_loss, inputs, grad_inputs=(0, 1), border=border)


@pytest.mark.parametrize("channel_offsets", [(-1, 1), (0, 0), (1, -1)], ids=str)
def test_channel_block_boundaries(channel_offsets, gen):
    """Cs, Ct = BLOCK_C + offsets: the channel loop ends inside a block, at its end, one past it."""
    cs, ct = (kernels.BLOCK_C + offset for offset in channel_offsets)
    inputs = [draw((1, cs, 5, 6), gen), draw((1, ct, 5, 6), gen)]
    compare_with_reference(triton_loss, reference.consistency_loss, inputs, grad_inputs=(0, 1),
                           border="same", dilation=2)


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2)], ids=str)
@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("channels_last", "strided")], ids=str)
def test_memory_layouts(layouts, config, gen):
    s, t = draw((2, 6, 9, 7), gen), draw((2, 3, 9, 7), gen)
    inputs = [as_layout(s, layouts[0]), as_layout(t, layouts[1])]
    _, grads = compare_with_reference(triton_loss, reference.consistency_loss, inputs, grad_inputs=(0, 1),
                                      **config)
    for x, grad in zip(inputs, grads):  # written into empty_like(x): the layout follows the input's
        assert grad.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("border", ["valid", "same"])
def test_gradient_reaches_only_the_inputs_that_require_it(border, gen):
    s, t = draw((2, 4, 6, 7), gen, torch.float64), draw((2, 2, 6, 7), gen, torch.float64)
    compare_with_reference(triton_loss, reference.consistency_loss, [s, t], grad_inputs=(0, 1), border=border)
    compare_with_reference(triton_loss, reference.consistency_loss, [s, t], grad_inputs=(1,), border=border)
    s, t = s.clone().requires_grad_(), t.clone()
    triton_loss(s, t, border=border).backward()
    assert s.grad is not None and t.grad is None
    s, t = s.detach(), t.requires_grad_()
    triton_loss(s, t, border=border).backward()
    assert s.grad is None and t.grad is not None


def test_gradcheck(gen):
    s = draw((1, 2, 3, 4), gen, torch.float64).requires_grad_()
    t = draw((1, 1, 3, 4), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: triton_loss(a, b, border="same"), (s, t))
    s = draw((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = draw((2, 2, 5, 6), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: triton_loss(a, b, dilation=2, reduction="sum"), (s, t),
                                    fast_mode=True)


def test_opcheck(gen):
    s = draw((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = draw((2, 2, 5, 6), gen, torch.float32)
    forward = torch.ops.fastkd.triton_consistency_forward.default
    torch.library.opcheck(forward, (s, t, True, 1))
    torch.library.opcheck(forward, (as_layout(t, "channels_last"), as_layout(s.detach(), "strided"), False, 2))
    loss_sum, difference = forward(s.detach(), t, True, 1)
    assert loss_sum.dtype == difference.dtype == torch.float64 and difference.shape == (2, 5, 6)
    grad_sum = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.fastkd.triton_consistency_backward.default,
                          (grad_sum, as_layout(t, "strided"), difference, 1, -1.0))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("poisoned", ["student", "teacher"])
def test_non_finite_input_gives_nan(poisoned, value, gen):
    s, t = draw((2, 3, 6, 7), gen), draw((2, 2, 6, 7), gen)
    (s if poisoned == "student" else t)[1, 1, 3, 4] = value
    assert torch.isnan(triton_loss(s, t))
    assert torch.isnan(triton_loss(s, t, border="same", dilation=2, reduction="sum"))


def test_bitwise_reproducible(gen):
    s = draw((2, 5, 13, 17), gen).requires_grad_()  # several tiles per image
    t = draw((2, 4, 13, 17), gen).requires_grad_()
    runs = []
    for _ in range(2):
        loss = triton_loss(s, t, border="same")
        runs.append((loss, *torch.autograd.grad(loss, (s, t))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("border", ["valid", "same"])
def test_near_convergence_float32(border, gen):
    s, t = near_converged_pair((1, 8, 48, 48), gen)
    assert_relative_error_below(triton_loss, reference.consistency_loss, s.to(DEVICE), t.to(DEVICE), 1e-4,
                                border=border)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=3, reduction="sum"),
                                    dict(border="same", dilation=6),  # only the horizontal edges exist
                                    dict(border="same", dilation=9)],  # no edge at all: c = 0
                         ids=str)
def test_matches_torch_backend(config, dtype, gen):
    """Both backends are float64 inside; the torch backend also covers dilations beyond the map."""
    s, t = draw((2, 5, 5, 9), gen, dtype), draw((2, 3, 5, 9), gen, dtype)
    results = []
    for loss_fn in (triton_loss, torch_loss):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = loss_fn(a, b, **config)
        results.append((loss, *torch.autograd.grad(loss, (a, b))))
    (loss, grad_s, grad_t), (expected, expected_s, expected_t) = results
    assert loss.dtype == expected.dtype and grad_s.dtype == grad_t.dtype == dtype
    assert_close(loss, expected, torch.float64)
    assert_close(grad_s, expected_s, dtype)
    assert_close(grad_t, expected_t, dtype)
    if config.get("dilation") == 9:
        assert loss == 0 and not grad_s.any() and not grad_t.any()


def test_saves_only_the_inputs_and_the_difference_map(gen):
    s, t = draw((2, 5, 16, 16), gen).requires_grad_(), draw((2, 5, 16, 16), gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = triton_loss(s, t)
    loss.backward()
    assert s.grad is not None
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= 2 * 16 * 16


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2, reduction="sum")], ids=str)
def test_compiles_without_graph_break_and_matches_eager(config, gen):
    loss = fastkd.ConsistencyLoss(backend="triton", **config)
    s = draw((2, 6, 9, 10), gen).requires_grad_()
    t = draw((2, 4, 9, 10), gen).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: loss(a, b), fullgraph=True, backend="aot_eager")
    value = compiled(s, t)
    grads = torch.autograd.grad(value, (s, t))
    expected = loss(s, t)
    expected_grads = torch.autograd.grad(expected, (s, t))
    torch.testing.assert_close(value, expected, rtol=1e-7, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7 * expected_grad.abs().max().item())
