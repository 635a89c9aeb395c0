"""The cpp backend of ConsistencyLoss (csrc/cpu/consistency_cpu.cpp: the CUDA kernels' per-pixel math run by
at::parallel_for on CPU tensors) against the literal float64 reference and the torch backend.

The losses are computed through ``IMPLEMENTATIONS["cpp"]`` with the public path's validation and final cast
(``cpp_loss`` below), so these tests do not depend on "cpp" being a name ``backend=`` accepts.
"""

import pytest
import torch

import fastkd
from fastkd import _extension, reference

if _extension.LOAD_ERROR is not None:
    pytest.skip(f"the cpp backend is unavailable: {_extension.LOAD_ERROR}", allow_module_level=True)

import fastkd.cpp_kernels.consistency  # noqa: E402,F401  (registers IMPLEMENTATIONS["cpp"])
from fastkd import _validation  # noqa: E402
from fastkd.ops import consistency as op  # noqa: E402
from fastkd.ops._common import finish  # noqa: E402
from helpers import DTYPES, as_layout, assert_close, compare_with_reference, randn  # noqa: E402
from test_pairwise_affinity import assert_relative_error_below, near_converged_pair  # noqa: E402

FORWARD = torch.ops.fastkd.cpp_consistency_forward.default
BACKWARD = torch.ops.fastkd.cpp_consistency_backward.default


def cpp_loss(s, t, border="valid", dilation=1, reduction="mean"):
    """``consistency_loss(s, t, ..., backend="cpp")``: the public path's checks, implementation and cast."""
    config = op.ConsistencyConfig.make(border, dilation, reduction)
    _validation.check_student_teacher(s, t, op.OP)
    op.check_map_size(s, config)
    return finish(op.IMPLEMENTATIONS["cpp"](s, t, config), s, t)


def torch_loss(s, t, **config):
    return fastkd.ConsistencyLoss(backend="torch", **config)(s, t)


def loss_and_grads(loss_fn, s, t, **config):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    loss = loss_fn(s, t, **config)
    return (loss, *torch.autograd.grad(loss, (s, t)))


CONFIGS = [dict(), dict(border="same", reduction="sum"), dict(dilation=2, reduction="sum"),
           dict(border="same", dilation=2)]
SHAPES = [(1, 5, 3, 7, 13), (3, 4, 6, 6, 5), (2, 1, 2, 5, 9)]  # B, Cs, Ct, H, W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference(config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    inputs = [randn((batch, cs, height, width), gen, dtype), randn((batch, ct, height, width), gen, dtype)]
    compare_with_reference(cpp_loss, reference.consistency_loss, inputs, **config)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_difference_map_is_c_s_minus_c_t_where_defined_and_0_elsewhere(config, gen):
    s, t = randn((2, 3, 8, 9), gen, torch.float64), randn((2, 5, 8, 9), gen, torch.float64)
    config = op.ConsistencyConfig.make(**config)
    loss_sum, difference = FORWARD(s, t, config.border == "valid", config.dilation)
    expected = torch.zeros(2, 8, 9, dtype=torch.float64)
    rows, cols = op.defined_region(8, 9, config)
    c_s, c_t = op.neighbour_map(s, config.dilation), op.neighbour_map(t, config.dilation)
    expected[:, rows, cols] = (c_s - c_t)[:, rows, cols]
    assert difference.dtype == loss_sum.dtype == torch.float64 and loss_sum.dim() == 0
    assert_close(difference, expected, torch.float64)
    assert_close(loss_sum, expected.square().sum(), torch.float64)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_dtypes_are_widened_to_the_common_one(dtypes, gen):
    """Each input is read in its own dtype and widened per element, exactly as widening it first would."""
    s, t = randn((2, 4, 7, 8), gen, dtypes[0]), randn((2, 3, 7, 8), gen, dtypes[1])
    common = torch.promote_types(*dtypes)
    loss, grad_s, grad_t = loss_and_grads(cpp_loss, s, t, border="same")
    expected, expected_s, expected_t = loss_and_grads(cpp_loss, s.to(common), t.to(common), border="same")
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
def test_memory_layouts(layouts, config, gen):
    s, t = randn((2, 6, 9, 7), gen), randn((2, 3, 9, 7), gen)
    inputs = [as_layout(s, layouts[0]), as_layout(t, layouts[1])]
    _, grads = compare_with_reference(cpp_loss, reference.consistency_loss, inputs, grad_inputs=(0, 1), **config)
    for x, grad in zip(inputs, grads):  # written into empty_like(x): the layout follows the input's
        assert grad.stride() == torch.empty_like(x).stride()


def test_transposed_and_expanded_views(gen):
    """Any strides: a transposed (H, W) view and a broadcast teacher (stride 0 along the batch)."""
    s = randn((2, 3, 9, 8), gen, torch.float64).transpose(2, 3)
    t = randn((1, 2, 8, 9), gen, torch.float64).expand(2, -1, -1, -1)
    compare_with_reference(cpp_loss, reference.consistency_loss, [s, t], grad_inputs=(0, 1), border="same")


@pytest.mark.parametrize("border", ["valid", "same"])
def test_gradient_reaches_only_the_inputs_that_require_it(border, gen):
    s, t = randn((2, 4, 6, 7), gen, torch.float64), randn((2, 2, 6, 7), gen, torch.float64)
    compare_with_reference(cpp_loss, reference.consistency_loss, [s, t], grad_inputs=(0, 1), border=border)
    compare_with_reference(cpp_loss, reference.consistency_loss, [s, t], grad_inputs=(1,), border=border)
    s, t = s.clone().requires_grad_(), t.clone()
    cpp_loss(s, t, border=border).backward()
    assert s.grad is not None and t.grad is None
    s, t = s.detach(), t.requires_grad_()
    cpp_loss(s, t, border=border).backward()
    assert s.grad is None and t.grad is not None


def test_gradcheck(gen):
    s = randn((1, 2, 3, 4), gen, torch.float64).requires_grad_()
    t = randn((1, 1, 3, 4), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cpp_loss(a, b, border="same"), (s, t))
    s = randn((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = randn((2, 2, 5, 6), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cpp_loss(a, b, dilation=2, reduction="sum"), (s, t))


def test_opcheck(gen):
    s = randn((2, 3, 5, 6), gen, torch.float64).requires_grad_()
    t = randn((2, 2, 5, 6), gen)
    torch.library.opcheck(FORWARD, (s, t, True, 1))
    torch.library.opcheck(FORWARD, (as_layout(t, "channels_last"), as_layout(s.detach(), "strided"), False, 2))
    torch.library.opcheck(FORWARD, (t.half(), t.bfloat16(), False, 1))
    loss_sum, difference = FORWARD(s.detach(), t, True, 1)
    assert loss_sum.dtype == difference.dtype == torch.float64 and difference.shape == (2, 5, 6)
    grad_sum = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(BACKWARD, (grad_sum, as_layout(t, "strided"), difference, 1, -1.0))
    torch.library.opcheck(BACKWARD, (grad_sum, as_layout(s.detach(), "channels_last").half(), difference, 2, 1.0))


def test_empty_inputs():
    loss_sum, difference = FORWARD(torch.zeros(0, 3, 5, 5), torch.zeros(0, 2, 5, 5), True, 1)
    assert loss_sum.item() == 0 and difference.shape == (0, 5, 5)
    loss_sum, difference = FORWARD(torch.zeros(2, 3, 0, 5), torch.zeros(2, 2, 0, 5), False, 1)
    assert loss_sum.item() == 0 and difference.shape == (2, 0, 5)
    grad = BACKWARD(torch.tensor(1.0, dtype=torch.float64), torch.zeros(2, 3, 0, 5), difference, 1, 1.0)
    assert grad.shape == (2, 3, 0, 5)


def test_invalid_arguments_are_refused():
    s, t = torch.zeros(1, 2, 5, 5), torch.zeros(1, 2, 5, 5)
    difference = torch.zeros(1, 5, 5, dtype=torch.float64)
    grad_sum = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must share B, H and W"):
        FORWARD(s, torch.zeros(1, 2, 5, 4), True, 1)
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        FORWARD(s[0], t[0], True, 1)
    with pytest.raises(RuntimeError, match="floating point"):
        FORWARD(s.long(), t, True, 1)
    with pytest.raises(RuntimeError, match="dilation"):
        FORWARD(s, t, True, 0)
    with pytest.raises(RuntimeError, match="difference"):
        BACKWARD(grad_sum, s, torch.zeros(1, 5, 4, dtype=torch.float64), 1, 1.0)
    with pytest.raises(RuntimeError, match="grad_sum"):
        BACKWARD(torch.ones(2, dtype=torch.float64), s, difference, 1, 1.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("poisoned", ["student", "teacher"])
def test_non_finite_input_gives_nan(poisoned, value, gen):
    s, t = randn((2, 3, 6, 7), gen), randn((2, 2, 6, 7), gen)
    (s if poisoned == "student" else t)[1, 1, 3, 4] = value
    assert torch.isnan(cpp_loss(s, t))
    assert torch.isnan(cpp_loss(s, t, border="same", dilation=2, reduction="sum"))


def test_bitwise_identical_for_any_number_of_threads(gen):
    """1, 2 and 3 threads split the rows differently (the maps are several parallel_for grains long);
    every output element and every row's partial sum is computed by one thread in a fixed order."""
    s, t = randn((4, 2, 96, 128), gen), randn((4, 3, 96, 128), gen, torch.float16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            loss_sum, difference = FORWARD(s, t, False, 1)
            grad_sum = torch.tensor(0.25, dtype=torch.float64)
            runs.append((loss_sum, difference, BACKWARD(grad_sum, s, difference, 1, 1.0),
                         BACKWARD(grad_sum, t, difference, 1, -1.0), *loss_and_grads(cpp_loss, s, t)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("border", ["valid", "same"])
def test_near_convergence_float32(border, gen):
    s, t = near_converged_pair((1, 8, 48, 48), gen)
    assert_relative_error_below(cpp_loss, reference.consistency_loss, s, t, 1e-4, border=border)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=3, reduction="sum"),
                                    dict(border="same", dilation=6),  # only the horizontal edges exist
                                    dict(border="same", dilation=9)],  # no edge at all: c = 0
                         ids=str)
def test_matches_torch_backend(config, dtype, gen):
    """Both backends are float64 inside; the torch backend also covers dilations beyond the map."""
    s, t = randn((2, 5, 5, 9), gen, dtype), randn((2, 3, 5, 9), gen, dtype)
    (loss, grad_s, grad_t) = loss_and_grads(cpp_loss, s, t, **config)
    (expected, expected_s, expected_t) = loss_and_grads(torch_loss, s, t, **config)
    assert loss.dtype == expected.dtype and grad_s.dtype == grad_t.dtype == dtype
    assert_close(loss, expected, torch.float64)
    assert_close(grad_s, expected_s, dtype)
    assert_close(grad_t, expected_t, dtype)
    if config.get("dilation") == 9:
        assert loss == 0 and not grad_s.any() and not grad_t.any()


@pytest.mark.skipif("cpp" not in fastkd.BACKENDS, reason='"cpp" is not a backend= name yet')
def test_public_backend_name_runs_the_cpp_ops(gen):
    s, t = randn((2, 4, 7, 8), gen), randn((2, 3, 7, 8), gen)
    for config in (dict(), dict(border="same", dilation=2, reduction="sum")):
        result = loss_and_grads(lambda a, b: fastkd.ConsistencyLoss(backend="cpp", **config)(a, b), s, t)
        assert all(torch.equal(a, b) for a, b in zip(result, loss_and_grads(cpp_loss, s, t, **config)))


def test_saves_only_the_inputs_and_the_difference_map(gen):
    s, t = randn((2, 5, 16, 16), gen).requires_grad_(), randn((2, 5, 16, 16), gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = cpp_loss(s, t)
    loss.backward()
    assert s.grad is not None
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= 2 * 16 * 16


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


def test_allocates_only_the_difference_map_and_the_gradient(gen):
    """No shifted copies and no (B, C, H, W) temporaries, not even to widen mixed dtypes: the forward
    allocates the (B, H, W) float64 map and the 0-dim sum, the backward the gradient."""
    shape_s, shape_t = (2, 6, 24, 20), (2, 4, 24, 20)
    s = as_layout(randn(shape_s, gen), "channels_last").requires_grad_()
    t = as_layout(randn(shape_t, gen, torch.bfloat16), "strided").requires_grad_()
    forward_bytes = bytes_allocated_by("fastkd::cpp_consistency_forward", lambda: FORWARD(s, t, True, 1))
    assert forward_bytes <= 8 * 2 * 24 * 20 + 64
    loss = cpp_loss(s, t)
    backward_bytes = bytes_allocated_by("fastkd::cpp_consistency_backward", lambda: loss.backward())
    assert backward_bytes <= 4 * s.numel() + 2 * t.numel() + 2 * 64


@pytest.mark.parametrize("config", [dict(), dict(border="same", dilation=2, reduction="sum")], ids=str)
def test_compiles_without_graph_break_and_matches_eager(config, gen):
    s = randn((2, 6, 9, 10), gen).requires_grad_()
    t = randn((2, 4, 9, 10), gen).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: cpp_loss(a, b, **config), fullgraph=True, backend="aot_eager")
    value = compiled(s, t)
    grads = torch.autograd.grad(value, (s, t))
    expected = cpp_loss(s, t, **config)
    expected_grads = torch.autograd.grad(expected, (s, t))
    torch.testing.assert_close(value, expected, rtol=1e-7, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7 * expected_grad.abs().max().item())
