"""ConsistencyLoss (the 8-neighbour map loss, op ``consistency``) on every backend: torch, triton, cuda and
cpp, against the literal float64 reference, against the torch backend, and through each kernel backend's
custom ops (``backend.ops("consistency")``: ``forward(s, t, valid, dilation) -> (loss_sum, difference)``,
``backward(grad_loss, x, difference, dilation, sign) -> dL/dx``).

Each test runs over the ``backend`` fixture of tests/helpers.py; checks that concern some backends only
(block boundaries of the kernels, the cpp ops' thread counts and allocations, the kernel ops' schema) narrow
it by indirect parametrisation. Without a GPU the Triton kernels run on CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1, tests/conftest.py) and the CUDA kernels under fastkd's CUDA emulator
(FASTKD_EMULATE_CUDA=1, set by the fixture); the maps are small, and the block-boundary cases are sized from
each kernel's own block constants (``backend.blocks("consistency")``).
"""

import math

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd import reference
from fastkd.ops import consistency_loss as loss_module
from fastkd.ops._common import finish
from fastkd.ops.consistency import torch_backend
import helpers
from helpers import (DTYPES, as_layout, assert_close, assert_relative_error_below, compare_with_reference,
                     near_converged_pair, randn)

backend = helpers.backend_fixture("torch", "triton", "cuda", "cpp")

KERNELS = ["triton", "cuda", "cpp"]  # the backends with custom ops


def draw(backend, shape, gen, dtype=torch.float32):
    """Standard normal values in ``dtype`` on the backend's device."""
    return randn(shape, gen, dtype).to(backend.device)


def loss_of(backend):
    """``ConsistencyLoss(backend=<name>, **config)(s, t)`` as a function of (s, t, **config)."""
    return lambda s, t, **config: fastkd.ConsistencyLoss(backend=backend.name, **config)(s, t)


def torch_loss(s, t, **config):
    return fastkd.ConsistencyLoss(backend="torch", **config)(s, t)


def loss_and_grads(loss_fn, s, t, **config):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    loss = loss_fn(s, t, **config)
    return (loss, *torch.autograd.grad(loss, (s, t)))


def most_square(pixels):
    """(height, width) with height * width = pixels and height <= width as close as possible."""
    height = max(h for h in range(1, math.isqrt(pixels) + 1) if pixels % h == 0)
    return height, pixels // height


CONFIGS = [dict(), dict(border="same"), dict(dilation=2), dict(dilation=3, border="same", reduction="sum"),
           dict(reduction="sum"), dict(border="same", reduction="sum"), dict(dilation=2, reduction="sum"),
           dict(border="same", dilation=2)]
SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 19, 19, 5, 5), (3, 4, 6, 6, 5), (2, 1, 2, 5, 9)]  # B, Cs, Ct, H, W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference(backend, config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    if config.get("border", "valid") == "valid" and min(height, width) < 2 * config.get("dilation", 1) + 1:
        height = width = 2 * config["dilation"] + 1  # the smallest map "valid" accepts
    inputs = [draw(backend, (batch, cs, height, width), gen, dtype),
              draw(backend, (batch, ct, height, width), gen, dtype)]
    compare_with_reference(loss_of(backend), reference.consistency_loss, inputs, **config)


@pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)
@pytest.mark.parametrize("pixel_offset", [-1, 0, 1])
@pytest.mark.parametrize("border", ["valid", "same"])
def test_pixel_block_boundaries(backend, border, pixel_offset, gen):
    """Maps of BLOCK_P - 1, BLOCK_P and BLOCK_P + 1 pixels, two images: tiles end inside and at the map."""
    pixels = backend.blocks("consistency")["pixels"] + pixel_offset
    height, width = most_square(pixels)
    if border == "valid" and height < 3:  # a prime pixel count: a 1-row map has no valid pixel
        height, width = 3, pixels // 3
    inputs = [draw(backend, (2, 3, height, width), gen, torch.float64),
              draw(backend, (2, 2, height, width), gen, torch.float64)]
    compare_with_reference(loss_of(backend), reference.consistency_loss, inputs, grad_inputs=(0, 1),
                           border=border)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("channel_offsets", [(-1, 1), (0, 0), (1, -1)], ids=str)
def test_channel_block_boundaries(backend, channel_offsets, gen):
    """Cs, Ct = BLOCK_C + offsets: the Triton channel loop ends inside a block, at its end, one past it. (The
    CUDA kernels take one channel at a time.)"""
    cs, ct = (backend.blocks("consistency")["channels"] + offset for offset in channel_offsets)
    inputs = [draw(backend, (1, cs, 5, 6), gen), draw(backend, (1, ct, 5, 6), gen)]
    compare_with_reference(loss_of(backend), reference.consistency_loss, inputs, grad_inputs=(0, 1),
                           border="same", dilation=2)



@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("height,width", [(7, 127), (8, 128), (9, 129), (17, 257)], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2)], ids=str)
def test_cpp_tiles(backend, height, width, config, gen):
    """The cpp forward works on tiles of kTileRows x kTilePixels pixels, the backward on rows of kTilePixels:
    maps that end inside, at and one past a tile in both directions; neighbours in the next tiles."""
    blocks = backend.blocks("consistency")
    assert height in (blocks["rows"] - 1, blocks["rows"], blocks["rows"] + 1, 2 * blocks["rows"] + 1)
    inputs = [draw(backend, (2, 3, height, width), gen, torch.float64),
              draw(backend, (2, 2, height, width), gen, torch.float64)]
    compare_with_reference(loss_of(backend), reference.consistency_loss, inputs, grad_inputs=(0, 1), **config)

@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("config", [CONFIGS[0], *CONFIGS[5:]], ids=str)
def test_difference_map_is_c_s_minus_c_t_where_defined_and_0_elsewhere(backend, config, gen):
    forward, _ = backend.ops("consistency")
    s, t = draw(backend, (2, 3, 8, 9), gen, torch.float64), draw(backend, (2, 5, 8, 9), gen, torch.float64)
    config = loss_module.ConsistencyConfig.make(**config)
    valid = config.border == "valid"
    loss_sum, difference = forward(s, t, valid, config.dilation)
    expected = torch.zeros(2, 8, 9, dtype=torch.float64)
    rows, cols = torch_backend.defined_region(8, 9, valid, config.dilation)
    c_s, c_t = (torch_backend.neighbour_map(x.cpu(), config.dilation) for x in (s, t))
    expected[:, rows, cols] = (c_s - c_t)[:, rows, cols]
    assert difference.dtype == loss_sum.dtype == torch.float64 and loss_sum.dim() == 0
    assert_close(difference.cpu(), expected, torch.float64)
    assert_close(loss_sum.cpu(), expected.square().sum(), torch.float64)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_dtypes_are_widened_to_the_common_one(backend, dtypes, gen):
    """Each input is read in its own dtype and widened per element, exactly as widening it first would."""
    s, t = draw(backend, (2, 4, 7, 8), gen, dtypes[0]), draw(backend, (2, 3, 7, 8), gen, dtypes[1])
    common = torch.promote_types(*dtypes)
    loss, grad_s, grad_t = loss_and_grads(loss_of(backend), s, t, border="same")
    expected, expected_s, expected_t = loss_and_grads(loss_of(backend), s.to(common), t.to(common), border="same")
    assert loss.dtype == expected.dtype and torch.equal(loss, expected)
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    # one rounding of the float64 gradient to the input's dtype here, two (common dtype, then it) there
    assert_close(grad_s, expected_s, s.dtype)
    assert_close(grad_t, expected_t, t.dtype)
    coarser = max(dtypes, key=lambda d: torch.finfo(d).eps)
    assert_close(loss, reference.consistency_loss(s.double(), t.double(), border="same"), coarser)


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2)], ids=str)
@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("channels_last", "strided"), ("contiguous", "channels_last")], ids=str)
def test_memory_layouts(backend, layouts, config, gen):
    s, t = randn((2, 6, 9, 7), gen), randn((2, 3, 9, 7), gen)
    inputs = backend.to(as_layout(s, layouts[0]), as_layout(t, layouts[1]))
    _, grads = compare_with_reference(loss_of(backend), reference.consistency_loss, inputs, grad_inputs=(0, 1),
                                      **config)
    for x, grad in zip(inputs, grads):  # written into empty_like(x): the layout follows the input's
        assert grad.stride() == torch.empty_like(x).stride()


def test_transposed_and_expanded_views(backend, gen):
    """Any strides: a transposed (H, W) view and a broadcast teacher (stride 0 along the batch)."""
    s = draw(backend, (2, 3, 9, 8), gen, torch.float64).transpose(2, 3)
    t = draw(backend, (1, 2, 8, 9), gen, torch.float64).expand(2, -1, -1, -1)
    compare_with_reference(loss_of(backend), reference.consistency_loss, [s, t], grad_inputs=(0, 1),
                           border="same")


@pytest.mark.parametrize("border", ["valid", "same"])
def test_gradient_reaches_only_the_inputs_that_require_it(backend, border, gen):
    loss = loss_of(backend)
    s, t = draw(backend, (2, 4, 6, 7), gen, torch.float64), draw(backend, (2, 2, 6, 7), gen, torch.float64)
    compare_with_reference(loss, reference.consistency_loss, [s, t], grad_inputs=(0, 1), border=border)
    compare_with_reference(loss, reference.consistency_loss, [s, t], grad_inputs=(1,), border=border)
    s, t = s.clone().requires_grad_(), t.clone()
    loss(s, t, border=border).backward()
    assert s.grad is not None and t.grad is None
    s, t = s.detach(), t.requires_grad_()
    loss(s, t, border=border).backward()
    assert s.grad is None and t.grad is not None


def test_gradcheck_on_a_small_map(backend, gen):
    s = draw(backend, (1, 2, 3, 4), gen, torch.float64).requires_grad_()
    t = draw(backend, (1, 1, 3, 4), gen, torch.float64).requires_grad_()
    loss = loss_of(backend)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, border="same"), (s, t))


@pytest.mark.parametrize("config", [dict(), dict(border="same"), dict(dilation=2, border="same"),
                                    dict(dilation=2, reduction="sum")], ids=str)
def test_gradcheck(backend, config, gen):
    """The full Jacobian on torch and cpp; triton and cuda (interpreted / emulated on CPU) take gradcheck's
    fast mode, a random projection of it."""
    s = draw(backend, (2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = draw(backend, (2, 2, 5, 6), gen, torch.float64).requires_grad_()
    loss = loss_of(backend)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, **config), (s, t),
                                    fast_mode=backend.name in ("triton", "cuda"))


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_opcheck(backend, gen):
    forward, backward = backend.ops("consistency")
    s = draw(backend, (2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = draw(backend, (2, 2, 5, 6), gen)
    torch.library.opcheck(forward, (s, t, True, 1))
    torch.library.opcheck(forward, (as_layout(t, "channels_last"), as_layout(s.detach(), "strided"), False, 2))
    torch.library.opcheck(forward, (t.half(), t.bfloat16(), False, 1))
    loss_sum, difference = forward(s.detach(), t, True, 1)
    assert loss_sum.dtype == difference.dtype == torch.float64 and difference.shape == (2, 5, 6)
    grad_sum = torch.tensor(0.5, dtype=torch.float64, device=backend.device)
    torch.library.opcheck(backward, (grad_sum, as_layout(t, "strided"), difference, 1, -1.0))
    torch.library.opcheck(backward, (grad_sum, as_layout(s.detach(), "channels_last").half(), difference, 2, 1.0))


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_empty_inputs(backend):
    forward, backward = backend.ops("consistency")
    loss_sum, difference = forward(torch.zeros(0, 3, 5, 5), torch.zeros(0, 2, 5, 5), True, 1)
    assert loss_sum.item() == 0 and difference.shape == (0, 5, 5)
    loss_sum, difference = forward(torch.zeros(2, 3, 0, 5), torch.zeros(2, 2, 0, 5), False, 1)
    assert loss_sum.item() == 0 and difference.shape == (2, 0, 5)
    grad = backward(torch.tensor(1.0, dtype=torch.float64), torch.zeros(2, 3, 0, 5), difference, 1, 1.0)
    assert grad.shape == (2, 3, 0, 5)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_invalid_arguments_are_refused(backend):
    forward, backward = backend.ops("consistency")
    s, t = torch.zeros(1, 2, 5, 5), torch.zeros(1, 2, 5, 5)
    difference = torch.zeros(1, 5, 5, dtype=torch.float64)
    grad_sum = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must share B, H and W"):
        forward(s, torch.zeros(1, 2, 5, 4), True, 1)
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        forward(s[0], t[0], True, 1)
    with pytest.raises(RuntimeError, match="floating point"):
        forward(s.long(), t, True, 1)
    with pytest.raises(RuntimeError, match="dilation"):
        forward(s, t, True, 0)
    with pytest.raises(RuntimeError, match="difference"):
        backward(grad_sum, s, torch.zeros(1, 5, 4, dtype=torch.float64), 1, 1.0)
    with pytest.raises(RuntimeError, match="grad_loss"):  # the schema's name for it (was grad_sum)
        backward(torch.ones(2, dtype=torch.float64), s, difference, 1, 1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("poisoned", ["student", "teacher"])
def test_non_finite_input_gives_nan(backend, poisoned, value, gen):
    s, t = draw(backend, (2, 3, 6, 7), gen), draw(backend, (2, 2, 6, 7), gen)
    (s if poisoned == "student" else t)[1, 1, 3, 4] = value
    loss = loss_of(backend)
    assert torch.isnan(loss(s, t))
    assert torch.isnan(loss(s, t, border="same", dilation=2, reduction="sum"))


def test_bitwise_reproducible(backend, gen):
    s = draw(backend, (2, 5, 13, 17), gen).requires_grad_()  # several tiles per image
    t = draw(backend, (2, 4, 13, 17), gen).requires_grad_()
    runs = []
    for _ in range(2):
        loss = loss_of(backend)(s, t, border="same")
        runs.append((loss, *torch.autograd.grad(loss, (s, t))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_bitwise_identical_for_any_number_of_threads(backend, gen):
    """1, 2 and 3 threads split the rows differently (the maps are several parallel_for grains long);
    every output element and every row's partial sum is computed by one thread in a fixed order."""
    forward, backward = backend.ops("consistency")
    s, t = randn((4, 2, 96, 128), gen), randn((4, 3, 96, 128), gen, torch.float16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            loss_sum, difference = forward(s, t, False, 1)
            grad_sum = torch.tensor(0.25, dtype=torch.float64)
            runs.append((loss_sum, difference, backward(grad_sum, s, difference, 1, 1.0),
                         backward(grad_sum, t, difference, 1, -1.0), *loss_and_grads(loss_of(backend), s, t)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


# The 64 x 64 maps take seconds per call under the Triton interpreter: triton runs the 48 x 48 ones only.
@pytest.mark.parametrize("backend, shape", [(name, (2, 19, 64, 64)) for name in ("torch", "cuda", "cpp")]
                         + [(name, (1, 8, 48, 48)) for name in ("torch", "triton", "cuda", "cpp")],
                         indirect=["backend"], ids=str)
@pytest.mark.parametrize("border", ["valid", "same"])
def test_near_convergence_float32(backend, border, shape, gen):
    s, t = backend.to(*near_converged_pair(shape, gen))
    assert_relative_error_below(loss_of(backend), reference.consistency_loss, s, t, 1e-4, border=border)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=3, reduction="sum"),
                                    dict(border="same", dilation=6),  # only the horizontal edges exist
                                    dict(border="same", dilation=9)],  # no edge at all: c = 0
                         ids=str)
def test_matches_torch_backend(backend, config, dtype, gen):
    """Both backends are float64 inside; the torch backend also covers dilations beyond the map."""
    s, t = draw(backend, (2, 5, 5, 9), gen, dtype), draw(backend, (2, 3, 5, 9), gen, dtype)
    (loss, grad_s, grad_t) = loss_and_grads(loss_of(backend), s, t, **config)
    (expected, expected_s, expected_t) = loss_and_grads(torch_loss, s, t, **config)
    assert loss.dtype == expected.dtype and grad_s.dtype == grad_t.dtype == dtype
    assert_close(loss, expected, torch.float64)
    assert_close(grad_s, expected_s, dtype)
    assert_close(grad_t, expected_t, dtype)
    if config.get("dilation") == 9:
        assert loss == 0 and not grad_s.any() and not grad_t.any()


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_public_backend_name_runs_the_cpp_ops(backend, gen):
    """``backend="cpp"`` gives bitwise what the cpp forward op (and its autograd) gives, reduced and cast as
    the loss does."""
    forward, _ = backend.ops("consistency")

    def through_the_op(a, b, border="valid", dilation=1, reduction="mean"):
        config = loss_module.ConsistencyConfig.make(border, dilation, reduction)
        total = forward(a, b, border == "valid", dilation)[0]
        return finish(total if reduction == "sum" else total / loss_module.defined_terms(a, config), a, b)

    s, t = randn((2, 4, 7, 8), gen), randn((2, 3, 7, 8), gen)
    for config in (dict(), dict(border="same", dilation=2, reduction="sum")):
        result = loss_and_grads(lambda a, b: fastkd.ConsistencyLoss(backend="cpp", **config)(a, b), s, t)
        assert all(torch.equal(a, b) for a, b in zip(result, loss_and_grads(through_the_op, s, t, **config)))


def test_saves_only_the_inputs_and_the_difference_map(backend, gen):
    """Only the inputs and the map difference are kept for backward: no shifted copies. The torch backend
    keeps the (B, H', W') difference where c is defined, the kernels the (B, H, W) one (0 elsewhere)."""
    s, t = draw(backend, (2, 5, 16, 16), gen).requires_grad_(), draw(backend, (2, 5, 16, 16), gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = loss_of(backend)(s, t)
    loss.backward()
    assert s.grad is not None
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= (2 * 14 * 14 if backend.name == "torch" else 2 * 16 * 16)


def bytes_allocated_by(name, fn):
    """The total of the CPU allocations made inside the calls of the op ``name`` while ``fn`` runs (freed
    or not: a temporary counts)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    found, total = [], 0

    def walk(node, inside):
        nonlocal total
        inside = inside or node.name == name
        if node.name == name:
            found.append(node)
        if inside and node.name == "[memory]":
            total += max(node.extra_fields.alloc_size, 0)
        for child in node.children:
            walk(child, inside)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, False)
    assert found, f"{name} did not run"
    return total


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_allocates_only_the_difference_map_and_the_gradient(backend, gen):
    """No shifted copies and no (B, C, H, W) temporaries, not even to widen mixed dtypes: the forward
    allocates the (B, H, W) float64 map and the 0-dim sum, the backward the gradient."""
    forward, _ = backend.ops("consistency")
    shape_s, shape_t = (2, 6, 24, 20), (2, 4, 24, 20)
    s = as_layout(randn(shape_s, gen), "channels_last").requires_grad_()
    t = as_layout(randn(shape_t, gen, torch.bfloat16), "strided").requires_grad_()
    forward_bytes = bytes_allocated_by(f"{backend.namespace}::consistency_forward", lambda: forward(s, t, True, 1))
    assert forward_bytes <= 8 * 2 * 24 * 20 + 64
    loss = loss_of(backend)(s, t)
    backward_bytes = bytes_allocated_by(f"{backend.namespace}::consistency_backward", lambda: loss.backward())
    assert backward_bytes <= 4 * s.numel() + 2 * t.numel() + 2 * 64


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2, reduction="sum")], ids=str)
def test_compiles_without_graph_break_and_matches_eager(backend, config, gen):
    loss = fastkd.ConsistencyLoss(backend=backend.name, **config)
    s = draw(backend, (2, 6, 9, 10), gen).requires_grad_()
    t = draw(backend, (2, 4, 9, 10), gen).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: loss(a, b), fullgraph=True, backend="aot_eager")
    value = compiled(s, t)
    grads = torch.autograd.grad(value, (s, t))
    expected = loss(s, t)
    expected_grads = torch.autograd.grad(expected, (s, t))
    torch.testing.assert_close(value, expected, rtol=1e-7, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7 * expected_grad.abs().max().item())


def test_module_matches_function(backend, gen):
    s, t = draw(backend, (2, 4, 5, 6), gen), draw(backend, (2, 3, 5, 6), gen)
    assert torch.equal(fastkd.ConsistencyLoss(border="same", dilation=2, backend=backend.name)(s, t),
                       F.consistency_loss(s, t, border="same", dilation=2, backend=backend.name))
    assert torch.equal(fastkd.ConsistencyLoss(border="same", dilation=2)(s, t),
                       F.consistency_loss(s, t, border="same", dilation=2))
