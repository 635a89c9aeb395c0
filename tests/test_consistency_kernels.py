"""The kernel backends of ConsistencyLoss (triton, cuda) against the literal float64 reference and the torch
backend.

Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter, and the CUDA kernels
under fastkd's CUDA emulator (FASTKD_EMULATE_CUDA=1); the maps are small, and the block-boundary cases
are sized from each kernel's own block constants.
"""

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import fastkd
from fastkd import _extension, reference
import helpers
from helpers import DTYPES, as_layout, assert_close, compare_with_reference, randn
from test_pairwise_affinity import assert_relative_error_below, near_converged_pair


@dataclass
class KernelBackend:
    name: str
    device: torch.device
    pixel_block: int  # pixels per program / thread block
    channel_block: Optional[int]  # channels per step of a program's channel loop (None: one at a time)
    forward: object  # the (s, t, valid, dilation) -> (loss_sum, difference) op
    backward: object  # the (grad_sum, x, difference, dilation, sign) -> dL/dx op

    def loss(self, s, t, **config):
        return fastkd.ConsistencyLoss(backend=self.name, **config)(s, t)

    def draw(self, shape, gen, dtype=torch.float32):
        return randn(shape, gen, dtype).to(self.device)


def triton_backend():
    kernels = helpers.triton_kernels("consistency", skip_module=False)
    return KernelBackend("triton", helpers.TRITON_DEVICE, kernels.BLOCK_P, kernels.BLOCK_C,
                         torch.ops.fastkd.triton_consistency_forward.default,
                         torch.ops.fastkd.triton_consistency_backward.default)


def cuda_backend():
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"the cuda backend is unavailable: {_extension.LOAD_ERROR}")
    # one thread per pixel, kThreads = 256 per block (csrc/kernels/consistency.cu); channels one at a time
    return KernelBackend("cuda", helpers.CUDA_DEVICE, 256, None, torch.ops.fastkd.cuda_consistency_forward.default,
                         torch.ops.fastkd.cuda_consistency_backward.default)


@pytest.fixture(params=["triton", "cuda"])
def kernel(request, monkeypatch):
    if request.param == "cuda" and helpers.CUDA_DEVICE.type == "cpu":
        monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
    return triton_backend() if request.param == "triton" else cuda_backend()


def torch_loss(s, t, **config):
    return fastkd.ConsistencyLoss(backend="torch", **config)(s, t)


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
def test_matches_reference(kernel, config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    inputs = [kernel.draw((batch, cs, height, width), gen, dtype),
              kernel.draw((batch, ct, height, width), gen, dtype)]
    compare_with_reference(kernel.loss, reference.consistency_loss, inputs, **config)


@pytest.mark.parametrize("pixel_offset", [-1, 0, 1])
@pytest.mark.parametrize("border", ["valid", "same"])
def test_pixel_block_boundaries(kernel, border, pixel_offset, gen):
    """Maps of BLOCK_P - 1, BLOCK_P and BLOCK_P + 1 pixels, two images: tiles end inside and at the map."""
    height, width = most_square(kernel.pixel_block + pixel_offset)
    if border == "valid" and height < 3:  # a prime pixel count: a 1-row map has no valid pixel
        height, width = 3, (kernel.pixel_block + pixel_offset) // 3
    inputs = [kernel.draw((2, 3, height, width), gen, torch.float64),
              kernel.draw((2, 2, height, width), gen, torch.float64)]
    compare_with_reference(kernel.loss, reference.consistency_loss, inputs, grad_inputs=(0, 1), border=border)


@pytest.mark.parametrize("channel_offsets", [(-1, 1), (0, 0), (1, -1)], ids=str)
def test_channel_block_boundaries(channel_offsets, gen):
    """Cs, Ct = BLOCK_C + offsets: the Triton channel loop ends inside a block, at its end, one past it. (The
    CUDA kernels take one channel at a time.)"""
    kernel = triton_backend()
    cs, ct = (kernel.channel_block + offset for offset in channel_offsets)
    inputs = [kernel.draw((1, cs, 5, 6), gen), kernel.draw((1, ct, 5, 6), gen)]
    compare_with_reference(kernel.loss, reference.consistency_loss, inputs, grad_inputs=(0, 1),
                           border="same", dilation=2)


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2)], ids=str)
@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("channels_last", "strided")], ids=str)
def test_memory_layouts(kernel, layouts, config, gen):
    s, t = kernel.draw((2, 6, 9, 7), gen), kernel.draw((2, 3, 9, 7), gen)
    inputs = [as_layout(s, layouts[0]), as_layout(t, layouts[1])]
    _, grads = compare_with_reference(kernel.loss, reference.consistency_loss, inputs, grad_inputs=(0, 1),
                                      **config)
    for x, grad in zip(inputs, grads):  # written into empty_like(x): the layout follows the input's
        assert grad.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("border", ["valid", "same"])
def test_gradient_reaches_only_the_inputs_that_require_it(kernel, border, gen):
    s, t = kernel.draw((2, 4, 6, 7), gen, torch.float64), kernel.draw((2, 2, 6, 7), gen, torch.float64)
    compare_with_reference(kernel.loss, reference.consistency_loss, [s, t], grad_inputs=(0, 1), border=border)
    compare_with_reference(kernel.loss, reference.consistency_loss, [s, t], grad_inputs=(1,), border=border)
    s, t = s.clone().requires_grad_(), t.clone()
    kernel.loss(s, t, border=border).backward()
    assert s.grad is not None and t.grad is None
    s, t = s.detach(), t.requires_grad_()
    kernel.loss(s, t, border=border).backward()
    assert s.grad is None and t.grad is not None


def test_gradcheck(kernel, gen):
    s = kernel.draw((1, 2, 3, 4), gen, torch.float64).requires_grad_()
    t = kernel.draw((1, 1, 3, 4), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernel.loss(a, b, border="same"), (s, t))
    s = kernel.draw((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = kernel.draw((2, 2, 5, 6), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernel.loss(a, b, dilation=2, reduction="sum"), (s, t),
                                    fast_mode=True)


def test_opcheck(kernel, gen):
    s = kernel.draw((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = kernel.draw((2, 2, 5, 6), gen)
    forward = kernel.forward
    torch.library.opcheck(forward, (s, t, True, 1))
    torch.library.opcheck(forward, (as_layout(t, "channels_last"), as_layout(s.detach(), "strided"), False, 2))
    loss_sum, difference = forward(s.detach(), t, True, 1)
    assert loss_sum.dtype == difference.dtype == torch.float64 and difference.shape == (2, 5, 6)
    grad_sum = torch.tensor(0.5, dtype=torch.float64, device=kernel.device)
    torch.library.opcheck(kernel.backward,
                          (grad_sum, as_layout(t, "strided"), difference, 1, -1.0))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("poisoned", ["student", "teacher"])
def test_non_finite_input_gives_nan(kernel, poisoned, value, gen):
    s, t = kernel.draw((2, 3, 6, 7), gen), kernel.draw((2, 2, 6, 7), gen)
    (s if poisoned == "student" else t)[1, 1, 3, 4] = value
    assert torch.isnan(kernel.loss(s, t))
    assert torch.isnan(kernel.loss(s, t, border="same", dilation=2, reduction="sum"))


def test_bitwise_reproducible(kernel, gen):
    s = kernel.draw((2, 5, 13, 17), gen).requires_grad_()  # several tiles per image
    t = kernel.draw((2, 4, 13, 17), gen).requires_grad_()
    runs = []
    for _ in range(2):
        loss = kernel.loss(s, t, border="same")
        runs.append((loss, *torch.autograd.grad(loss, (s, t))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("border", ["valid", "same"])
def test_near_convergence_float32(kernel, border, gen):
    s, t = near_converged_pair((1, 8, 48, 48), gen)
    assert_relative_error_below(kernel.loss, reference.consistency_loss, s.to(kernel.device),
                                t.to(kernel.device), 1e-4,
                                border=border)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=3, reduction="sum"),
                                    dict(border="same", dilation=6),  # only the horizontal edges exist
                                    dict(border="same", dilation=9)],  # no edge at all: c = 0
                         ids=str)
def test_matches_torch_backend(kernel, config, dtype, gen):
    """Both backends are float64 inside; the torch backend also covers dilations beyond the map."""
    s, t = kernel.draw((2, 5, 5, 9), gen, dtype), kernel.draw((2, 3, 5, 9), gen, dtype)
    results = []
    for loss_fn in (kernel.loss, torch_loss):
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


def test_saves_only_the_inputs_and_the_difference_map(kernel, gen):
    s, t = kernel.draw((2, 5, 16, 16), gen).requires_grad_(), kernel.draw((2, 5, 16, 16), gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = kernel.loss(s, t)
    loss.backward()
    assert s.grad is not None
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= 2 * 16 * 16


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2, reduction="sum")], ids=str)
def test_compiles_without_graph_break_and_matches_eager(kernel, config, gen):
    loss = fastkd.ConsistencyLoss(backend=kernel.name, **config)
    s = kernel.draw((2, 6, 9, 10), gen).requires_grad_()
    t = kernel.draw((2, 4, 9, 10), gen).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: loss(a, b), fullgraph=True, backend="aot_eager")
    value = compiled(s, t)
    grads = torch.autograd.grad(value, (s, t))
    expected = loss(s, t)
    expected_grads = torch.autograd.grad(expected, (s, t))
    torch.testing.assert_close(value, expected, rtol=1e-7, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7 * expected_grad.abs().max().item())
