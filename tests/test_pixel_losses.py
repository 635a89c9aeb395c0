"""ProbabilityLoss and PixelwiseKDLoss (ops ``probability`` and ``pixelwise_kd``) on every backend that implements
them (torch, triton, cuda, cpp), against the literal float64 reference: forward and both gradients, odd shapes, every
dtype, mixed dtypes, memory layouts, the kernels' block boundaries, near convergence, gradcheck; and the kernel
backends' custom ops (one schema per op, ``fastkd/ops/_per_pixel_schema.py``) through ``opcheck``.
"""

import os
import sys

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd import reference
import helpers
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
KERNELS = ["triton", "cuda", "cpp"]  # the backends with custom ops

backend = helpers.backend_fixture("torch", "triton", "cuda", "cpp")


def logits(backend, shape, gen, dtype=torch.float32):
    s, t = randn(shape, gen, dtype, scale=3.0), randn(shape, gen, dtype, scale=3.0)
    return backend.to(s, t)


def loss_of(backend, name):
    loss_fn = LOSSES[name][0]
    return lambda s, t, *args, **config: loss_fn(s, t, *args, backend=backend.name, **config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 19, 7, 13), (3, 2, 4, 5), (2, 5, 1, 1)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name,config", CASES, ids=str)
def test_matches_reference(backend, name, config, masked, shape, dtype, gen):
    reference_fn = LOSSES[name][1]
    mask = (torch.rand(shape[0], *shape[2:], generator=gen) > 0.3).to(backend.device) if masked else None
    compare_with_reference(lambda s, t: loss_of(backend, name)(s, t, mask, **config),
                           lambda s, t: reference_fn(s, t, mask, **config), logits(backend, shape, gen, dtype),
                           grad_inputs=(0, 1), dtype=dtype)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_mixed_dtypes(backend, name, dtypes, gen):
    """Student and teacher of different dtypes are each read in their own; the gradients come back in them."""
    s, t = logits(backend, (2, 7, 5, 6), gen)
    inputs = [s.to(dtypes[0]), t.to(dtypes[1])]
    coarser = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16  # the tolerance of the coarser
    compare_with_reference(loss_of(backend, name), LOSSES[name][1], inputs, grad_inputs=(0, 1), dtype=coarser)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("name", LOSSES)
def test_memory_layouts(backend, name, layout, gen):
    s, t = logits(backend, (2, 6, 9, 7), gen)
    inputs = [as_layout(s.cpu(), layout).to(backend.device), as_layout(t.cpu(), "contiguous").to(backend.device)]
    loss, grads = compare_with_reference(loss_of(backend, name), LOSSES[name][1], inputs, grad_inputs=(0, 1))
    if backend.name in KERNELS and layout == "channels_last":  # the kernels write it in the input's layout
        assert grads[0].stride() == inputs[0].stride()


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("pixel_offset", [-1, 0, 1, 257])
@pytest.mark.parametrize("name", LOSSES)
def test_pixel_block_boundaries(backend, name, pixel_offset, gen):
    """Maps of a kernel's pixel block size and one off, and more than a block, in one or several rows."""
    pixels = backend.blocks(name)["pixels"] + pixel_offset
    for height, width in ((1, pixels), (pixels, 1)):
        s, t = logits(backend, (2, 3, height, width), gen, torch.float64)
        compare_with_reference(loss_of(backend, name), LOSSES[name][1], [s, t], grad_inputs=(0, 1))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("channel_offset", [-1, 0, 1])
@pytest.mark.parametrize("name", LOSSES)
def test_channel_block_boundaries(backend, name, channel_offset, gen):
    """Channel counts around a kernel's channel step (triton), its first step (cuda: 1, 2 and 3 channels) or the
    count that shrinks its pixel block (cpp)."""
    channels = backend.blocks(name)["channels"] + channel_offset
    s, t = logits(backend, (1, channels, 3, 5), gen, torch.float64)
    compare_with_reference(loss_of(backend, name), LOSSES[name][1], [s, t], grad_inputs=(0, 1))


@pytest.mark.parametrize("name", LOSSES)
def test_near_convergence_within_1e6_of_reference(backend, name, gen):
    """Teacher = student (1 + 1e-3 noise), float32 logits: the loss and the student's gradient are within 1e-6
    (relative) of the float64 reference on the same rounded inputs; float32 arithmetic would be ~1e-4 off."""
    s = randn((2, 19, 24, 40), gen, scale=3.0)
    t = (s.double() * (1 + 1e-3 * torch.randn(s.shape, generator=gen, dtype=torch.float64))).float()
    s, t = backend.to(s, t)
    a = s.detach().requires_grad_()
    loss = loss_of(backend, name)(a, t)
    (grad,) = torch.autograd.grad(loss, a)
    exact = s.detach().double().requires_grad_()
    expected = LOSSES[name][1](exact, t.double())
    (expected_grad,) = torch.autograd.grad(expected, exact)
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    assert (grad.double() - expected_grad).abs().max().item() <= 1e-6 * expected_grad.abs().max().item()


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(backend, name, gen):
    s, t = logits(backend, (2, 4, 3, 5), gen, torch.float64)
    mask = (torch.rand(2, 3, 5, generator=gen) > 0.5).to(backend.device)
    assert torch.autograd.gradcheck(lambda a, b: loss_of(backend, name)(a, b, mask),
                                    (s.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("name", LOSSES)
def test_uncounted_pixels_are_ignored_even_when_nan(backend, name, gen):
    s, t = logits(backend, (2, 4, 3, 5), gen)
    mask = torch.ones(2, 3, 5, dtype=torch.bool, device=backend.device)
    mask[1, 2, 4] = False
    poisoned = s.clone()
    poisoned[1, :, 2, 4] = float("nan")
    assert torch.equal(loss_of(backend, name)(poisoned, t, mask), loss_of(backend, name)(s, t, mask))
    assert loss_of(backend, name)(s, t, torch.zeros_like(mask)).item() == 0  # no counted pixel: 0


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("name", LOSSES)
def test_kernels_give_zero_gradient_at_uncounted_pixels_and_nan_at_counted_ones(backend, name, gen):
    """The kernels' gradient is exactly 0 where the pixel is not counted, whatever its logits; a counted
    pixel with a NaN or -Inf logit gives NaN (the torch backend's softmax gradient is NaN at both)."""
    s, t = logits(backend, (2, 4, 3, 5), gen)
    s[1, :, 2, 4] = float("nan")
    s[0, 1, 0, 0] = float("-inf")
    mask = torch.ones(2, 3, 5, dtype=torch.bool, device=backend.device)
    mask[1, 2, 4] = False
    a = s.requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(backend, name)(a, t, mask), a)
    assert torch.equal(grad[1, :, 2, 4], torch.zeros(4, device=backend.device))
    assert grad[0, :, 0, 0].isnan().all()
    assert torch.isfinite(grad[:, :, 1:]).all()


@pytest.mark.parametrize("name", LOSSES)
def test_module_matches_function(backend, name, gen):
    _, _, module = LOSSES[name]
    s, t = logits(backend, (2, 4, 3, 5), gen)
    mask = (torch.rand(2, 3, 5, generator=gen) > 0.5).to(backend.device)
    assert torch.equal(module(reduction="sum", backend=backend.name)(s, t, mask),
                       loss_of(backend, name)(s, t, mask, reduction="sum"))


def test_kd_is_zero_for_identical_logits_and_scales_with_t_squared(backend, gen):
    s, t = logits(backend, (2, 4, 3, 5), gen, torch.float64)
    assert loss_of(backend, "pixelwise_kd")(s, s).abs().item() < 1e-15
    # T^2 KL at T -> large behaves like the squared logit distance, independent of T: finite and positive
    assert 0 < loss_of(backend, "pixelwise_kd")(s, t, temperature=100.0).item() < float("inf")


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("name", LOSSES)
def test_custom_ops_pass_opcheck(backend, name, gen):
    """Schema, fake implementation and autograd registration of each kernel backend's two custom ops."""
    forward, backward = backend.ops(name)
    params = (2.0,) if name == "pixelwise_kd" else ()
    s, t = logits(backend, (2, 5, 3, 4), gen)
    torch.library.opcheck(forward, (s.requires_grad_(), t, *params))
    torch.library.opcheck(forward, (as_layout(s.detach().cpu(), "channels_last").to(backend.device).half(),
                                    t.double(), *params))
    grad_terms = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64).to(backend.device)
    for wrt in (0, 1):
        torch.library.opcheck(backward, (grad_terms, s.detach(), t.bfloat16(), *params, wrt))


def huge_page_advice(tensor: torch.Tensor) -> tuple[int, int]:
    """(bytes of ``tensor``'s whole 2 MiB pages, bytes of them in mappings advised MADV_HUGEPAGE: VmFlags "hg" in
    /proc/self/smaps; madvise splits a mapping where its advice starts and ends)."""
    huge_page = 2**21
    begin = tensor.data_ptr()
    first = -(-begin // huge_page) * huge_page
    last = (begin + tensor.numel() * tensor.element_size()) // huge_page * huge_page
    advised, mapping = 0, None
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                mapping = tuple(int(bound, 16) for bound in fields[0].split("-"))
            elif fields and fields[0] == "VmFlags:" and "hg" in fields[1:] and mapping is not None:
                advised += max(0, min(last, mapping[1]) - max(first, mapping[0]))
    return max(0, last - first), advised


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_gradient_is_advised_onto_huge_pages(backend, gen):
    """The C++ CPU implementations ask for transparent huge pages for their full-size outputs
    (csrc/common/huge_pages_cpu.h): a fresh 4 KiB page costs a fault and a zeroing, which for a gradient
    written once is as slow as the kernel itself. What fastkd controls is the advice: every whole 2 MiB page of
    the gradient is advised MADV_HUGEPAGE. Whether the kernel then backs them with huge pages depends on its mode
    and on how fragmented free memory is (a CI run under memory pressure got 2 of 7), so that is not asserted;
    the result is the same either way."""
    s = randn((1, 4, 1024, 1024), gen).requires_grad_()  # a 16 MiB gradient: at least 7 whole 2 MiB pages
    t = randn((1, 4, 1024, 1024), gen)
    (grad,) = torch.autograd.grad(fastkd.PixelwiseKDLoss(backend="cpp")(s, t), s)
    whole_pages, advised = huge_page_advice(grad)
    assert whole_pages >= 7 * 2**21, whole_pages
    # A kernel built without transparent huge pages refuses the advice (and has no such folder).
    offered = os.path.isdir("/sys/kernel/mm/transparent_hugepage")
    assert advised == (whole_pages if offered else 0), (advised, whole_pages)
    expected = torch.autograd.grad(fastkd.PixelwiseKDLoss(backend="torch")(s, t), s)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-12)
