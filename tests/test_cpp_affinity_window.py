"""The cpp backend of the windowed PairwiseAffinityLoss graph (csrc/cpu/affinity_window_cpu.cpp: the CUDA
kernels' per-node math run by at::parallel_for on CPU tensors) against the literal float64 reference, the
CUDA kernels run by the emulator, and itself under other thread counts.

The sums are taken through ``fastkd.cpp_kernels.affinity_window.window_graph_sum``, so these tests do not
depend on "cpp" being a name ``backend=`` accepts.
"""

import pytest
import torch

from fastkd import _extension, reference
from fastkd.ops._common import result_dtype
from fastkd.ops.pairwise_affinity import PairwiseAffinityConfig
from helpers import DTYPES, as_layout, assert_close, compare_with_reference, randn
from test_pairwise_affinity import unique_patch_maxima

if _extension.LOAD_ERROR is not None:
    pytest.skip(f"the cpp backend is unavailable: {_extension.LOAD_ERROR}", allow_module_level=True)

import fastkd.cpp_kernels.affinity_window as kernels  # noqa: E402

FORWARD = torch.ops.fastkd.cpp_affinity_window_forward.default
BACKWARD = torch.ops.fastkd.cpp_affinity_window_backward.default


def window_loss(s, t, patch=1, pool="avg", pool_scale=None, window=0, eps=1e-8, detach_norm=False):
    """The cpp windowed sum, in the dtype the public loss returns."""
    config = PairwiseAffinityConfig.make(patch=patch, pool=pool, pool_scale=pool_scale, window=window, eps=eps,
                                         detach_norm=detach_norm, reduction="sum")
    return kernels.window_graph_sum(s, t, config).to(result_dtype(s, t))


def reference_loss(s, t, **config):
    """The literal float64 reference, summed over (b, i, connected j)."""
    return reference.pairwise_affinity_loss(s, t, reduction="sum", **config)


def pair(shape, gen, dtype=torch.float64, config=None):
    """Student (B, Cs, H, W) and teacher (B, Ct, H, W); tie-free patches for max pooling."""
    batch, cs, ct, height, width = shape
    s = unique_patch_maxima(randn((batch, cs, height, width), gen, dtype), gen, config or {})
    t = unique_patch_maxima(randn((batch, ct, height, width), gen, dtype), gen, config or {})
    return s, t


def loss_and_grads(s, t, **config):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    loss = window_loss(s, t, **config)
    return (loss, *torch.autograd.grad(loss, (s, t)))


# (config, (B, Cs, Ct, H, W)): windows 0-2, every pooling, detach_norm, odd grids, Cs != Ct.
CASES = [
    (dict(window=0, eps=0.5), (1, 5, 3, 4, 5)),  # only a_ii = (|f| / (|f| + eps))^2: needs a large eps
    (dict(window=1), (2, 5, 3, 7, 13)),
    (dict(window=2), (1, 4, 6, 6, 5)),
    (dict(window=1, patch=(2, 3), detach_norm=True), (1, 3, 5, 7, 11)),  # 4 x 4 nodes, partial patches
    (dict(window=2, patch=2, pool="max"), (1, 4, 3, 7, 8)),  # 4 x 4 nodes, partial patches
    (dict(window=1, pool_scale=0.3, detach_norm=True), (1, 3, 4, 10, 9)),  # 3 x 2 max patches, 4 x 5 nodes
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape", CASES, ids=str)
def test_matches_reference(config, shape, dtype, gen):
    compare_with_reference(window_loss, reference_loss, pair(shape, gen, dtype, config), grad_inputs=(0, 1),
                           **config)


def test_window_covering_the_grid(gen):
    """r >= max(grid) - 1 (routed to the full graph by the loss) is still the windowed sum."""
    compare_with_reference(window_loss, reference_loss, pair((1, 3, 4, 3, 4), gen), grad_inputs=(0, 1), window=5)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_dtypes_are_read_as_the_common_one(dtypes, gen):
    """Each input is read in its own dtype and widened per element, exactly as widening it first would."""
    config = dict(window=1, patch=(1, 2))
    s, t = pair((2, 4, 3, 6, 7), gen, torch.float64)
    s, t = s.to(dtypes[0]), t.to(dtypes[1])
    common = torch.promote_types(*dtypes)
    loss, grad_s, grad_t = loss_and_grads(s, t, **config)
    expected, expected_s, expected_t = loss_and_grads(s.to(common), t.to(common), **config)
    assert loss.dtype == expected.dtype and torch.equal(loss, expected)
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    assert_close(grad_s, expected_s, s.dtype)  # one rounding here, two (common dtype, then s's) there
    assert_close(grad_t, expected_t, t.dtype)
    coarser = max(dtypes, key=lambda d: torch.finfo(d).eps)
    assert_close(loss, reference_loss(s.double(), t.double(), **config), coarser)


@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("channels_last", "strided"), ("contiguous", "channels_last")], ids=str)
def test_memory_layouts_and_teacher_gradient(layouts, gen):
    config = dict(window=1, patch=(2, 1), pool="max")
    s, t = pair((2, 6, 5, 7, 5), gen, torch.float32, config)
    inputs = [as_layout(s, layouts[0]), as_layout(t, layouts[1])]
    _, grads = compare_with_reference(window_loss, reference_loss, inputs, grad_inputs=(0, 1), **config)
    for x, grad in zip(inputs, grads):  # written into empty_like(x): the layout follows the input's
        assert grad.stride() == torch.empty_like(x).stride()


def test_transposed_and_expanded_views(gen):
    """Any strides: a transposed (H, W) view and a broadcast teacher (stride 0 along the batch)."""
    s = randn((2, 3, 9, 8), gen, torch.float64).transpose(2, 3)
    t = randn((1, 2, 8, 9), gen, torch.float64).expand(2, -1, -1, -1)
    compare_with_reference(window_loss, reference_loss, [s, t], grad_inputs=(0, 1), window=2, patch=(1, 2))


def test_gradient_reaches_only_the_inputs_that_require_it(gen):
    s, t = pair((1, 3, 4, 5, 6), gen)
    compare_with_reference(window_loss, reference_loss, [s, t], grad_inputs=(1,), window=1)
    s.requires_grad_()
    window_loss(s, t, window=1).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    s, t = s.detach(), t.requires_grad_()
    window_loss(s, t, window=1).backward()
    assert s.grad is None and t.grad is not None and t.grad.abs().sum() > 0


# detach_norm=True is left out: its backward treats ||f|| as a constant, which is not the derivative
# gradcheck measures (test_matches_reference checks it against the reference, which detaches too).
@pytest.mark.parametrize("config,shape", [(dict(window=1), (1, 2, 3, 4, 5)),
                                          (dict(window=1, patch=2, pool="max"), (1, 2, 3, 6, 6)),
                                          (dict(window=2, patch=(2, 3)), (2, 2, 1, 5, 7))], ids=str)
def test_gradcheck(config, shape, gen):
    s, t = pair(shape, gen, torch.float64, config)
    assert torch.autograd.gradcheck(lambda a, b: window_loss(a, b, **config),
                                    (s.requires_grad_(), t.requires_grad_()), fast_mode=True)


def test_opcheck(gen):
    s, t = pair((1, 3, 2, 4, 5), gen)
    forward_args = (s.requires_grad_(), t.requires_grad_(), 2, 1, False, 1, 1e-8, False)
    torch.library.opcheck(FORWARD, forward_args)
    torch.library.opcheck(FORWARD, (as_layout(t.detach(), "channels_last"), as_layout(s.detach().float(), "strided"),
                                    2, 2, True, 3, 0.5, True))
    torch.library.opcheck(FORWARD, (t.detach().half(), s.detach().bfloat16(), 1, 2, False, 2, 1e-8, False))
    total, difference, s_norms, t_norms = FORWARD(*forward_args)
    assert total.dtype == difference.dtype == s_norms.dtype == torch.float64
    assert s_norms.shape == t_norms.shape == (1, 2 * 5)
    assert difference.shape == (1, 1 * 3 + 2, 2 * 5)  # offsets (0, 0), (0, 1) and (1, -1..1)
    grad_total = torch.tensor(0.5, dtype=torch.float64)
    backward_args = (grad_total, as_layout(t.detach(), "strided"), t_norms, difference, 2, 1, False, 1, 1e-8, False,
                     -1.0)
    torch.library.opcheck(BACKWARD, backward_args)
    torch.library.opcheck(BACKWARD, (grad_total, as_layout(s.detach(), "channels_last").half(), s_norms, difference,
                                     2, 1, False, 1, 1e-8, True, 1.0))
    assert BACKWARD(*backward_args).shape == t.shape


@pytest.mark.parametrize("shape", [(0, 3, 2, 4, 5), (2, 3, 2, 4, 0)], ids=str)
def test_empty_inputs(shape, gen):
    """No image or no pixel: a zero total, shapes as the fake implementations give them."""
    s, t = pair(shape, gen)
    forward_args = (s.requires_grad_(), t, 1, 1, False, 1, 1e-8, False)
    torch.library.opcheck(FORWARD, forward_args)
    total, difference, s_norms, _ = FORWARD(*forward_args)
    assert total.item() == 0 and difference.numel() == s_norms.numel() == 0
    grad = BACKWARD(torch.ones((), dtype=torch.float64), s.detach(), s_norms, difference, 1, 1, False, 1, 1e-8,
                    False, 1.0)
    assert grad.shape == s.shape


def test_invalid_arguments_are_refused():
    s, t = torch.zeros(1, 2, 5, 5), torch.zeros(1, 2, 5, 5)
    total, difference, norms, _ = FORWARD(s, t, 1, 1, False, 1, 1e-8, False)
    grad_total = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must share B, H and W"):
        FORWARD(s, torch.zeros(1, 2, 5, 4), 1, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        FORWARD(s[0], t[0], 1, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match="floating point"):
        FORWARD(s.long(), t, 1, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match="kernel_h"):
        FORWARD(s, t, 0, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match="window"):
        FORWARD(s, t, 1, 1, False, -1, 1e-8, False)
    with pytest.raises(RuntimeError, match="difference"):
        BACKWARD(grad_total, s, norms, difference[:, :1], 1, 1, False, 1, 1e-8, False, 1.0)
    with pytest.raises(RuntimeError, match="norms"):
        BACKWARD(grad_total, s, norms[:, :3], difference, 1, 1, False, 1, 1e-8, False, 1.0)
    with pytest.raises(RuntimeError, match="grad_total"):
        BACKWARD(torch.ones(2, dtype=torch.float64), s, norms, difference, 1, 1, False, 1, 1e-8, False, 1.0)


@pytest.mark.parametrize("config", [dict(window=1, patch=2), dict(window=1, patch=2, pool="max"), dict(window=0)],
                         ids=str)
@pytest.mark.parametrize("which,value", [(0, float("nan")), (1, float("inf")), (0, float("-inf"))])
def test_non_finite_input_gives_nan(which, value, config, gen):
    inputs = list(pair((1, 3, 4, 5, 6), gen))
    inputs[which][0, 1, 2, 3] = value
    assert torch.isnan(window_loss(*inputs, **config))


def test_bitwise_identical_for_any_number_of_threads(gen):
    """1, 2 and 3 threads split the nodes differently (the maps are many parallel_for grains long); every
    output element and every block's partial sum is computed by one thread in a fixed order."""
    s, t = randn((3, 6, 40, 44), gen), randn((3, 5, 40, 44), gen, torch.float16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            outputs = FORWARD(s, t, 1, 2, False, 2, 1e-8, False)
            runs.append((*outputs, *loss_and_grads(s, t, window=2, patch=(1, 2)),
                         *loss_and_grads(s, t, window=1, patch=2, pool="max", detach_norm=True)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("config", [dict(window=1, patch=(2, 1), pool="max"), dict(window=2, detach_norm=True),
                                    dict(window=1, pool_scale=0.3)], ids=str)
def test_matches_emulated_cuda_kernels(config, monkeypatch, gen):
    """The CUDA kernels (run by the emulator) share the math: D maps, norms, sums and gradients agree to
    rounding (the sums are added in another order)."""
    monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
    import fastkd.cuda_kernels.affinity_window as cuda_kernels

    s, t = pair((2, 5, 3, 7, 9), gen, torch.float32, config)
    full = PairwiseAffinityConfig.make(reduction="sum", **config)
    results = []
    for module in (kernels, cuda_kernels):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        total = module.window_graph_sum(a, b, full)
        results.append((total, *torch.autograd.grad(total, (a, b))))
    for got, want in zip(*results):  # float64 totals; gradients in the inputs' float32, each rounded once
        assert got.dtype == want.dtype
        assert_close(got, want, got.dtype)
    ops = (FORWARD, torch.ops.fastkd.cuda_affinity_window_forward.default)
    args = (s, t, 2, 1, True, 1, 1e-8, False)
    for got, want in zip(ops[0](*args), ops[1](*args)):
        assert got.shape == want.shape
        assert_close(got, want, torch.float64)


def test_saves_only_the_inputs_norms_and_difference(gen):
    s, t = randn((2, 5, 16, 16), gen).requires_grad_(), randn((2, 5, 16, 16), gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = window_loss(s, t, window=1)
    loss.backward()
    assert s.grad is not None
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= 5 * 2 * 16 * 16  # the (B, half, m) difference, half = 5 for r = 1


def test_compiles_fullgraph_and_matches_eager(gen):
    s, t = pair((2, 3, 4, 6, 7), gen, torch.float32)

    def fn(a, b):
        return window_loss(a, b, window=1, patch=(2, 1)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss, expected = compiled(a, b), fn(s.requires_grad_(), t.requires_grad_())
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(loss, (a, b)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
