"""CUDA kernels of the windowed PairwiseAffinityLoss graph (csrc/kernels/affinity_window.cu) against the
literal float64 reference.

Without a GPU the kernels run on CPU tensors through fastkd's CUDA emulator (which also checks the shared
memory for races and the barriers for divergence); the maps are small, and the block-boundary cases are
sized from the kernels' thread-block size.
"""

import math

import pytest
import torch

import helpers
from fastkd import _extension, reference
from fastkd.ops._common import result_dtype
from fastkd.ops.pairwise_affinity import PairwiseAffinityConfig
from helpers import DTYPES, as_layout, assert_close, compare_with_reference, randn
from test_pairwise_affinity import assert_relative_error_below, near_converged_pair, unique_patch_maxima

if _extension.LOAD_ERROR is not None:
    pytest.skip(f"the cuda backend is unavailable: {_extension.LOAD_ERROR}", allow_module_level=True)

import fastkd.cuda_kernels.affinity_window as kernels  # noqa: E402

DEVICE = helpers.CUDA_DEVICE
THREADS = 256  # kThreads in csrc/kernels/affinity_window.cu: nodes per block of the node kernels
FORWARD = torch.ops.fastkd.cuda_affinity_window_forward.default
BACKWARD = torch.ops.fastkd.cuda_affinity_window_backward.default


@pytest.fixture(autouse=True)
def emulate_on_cpu(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")


def window_loss(s, t, patch=1, pool="avg", pool_scale=None, window=0, eps=1e-8, detach_norm=False):
    """The kernels' windowed sum, in the dtype the public loss returns."""
    config = PairwiseAffinityConfig.make(patch=patch, pool=pool, pool_scale=pool_scale, window=window, eps=eps,
                                         detach_norm=detach_norm, reduction="sum")
    return kernels.window_graph_sum(s, t, config).to(result_dtype(s, t))


def reference_loss(s, t, **config):
    """The literal float64 reference, summed over (b, i, connected j)."""
    return reference.pairwise_affinity_loss(s, t, reduction="sum", **config)


def pair(shape, gen, dtype=torch.float64, config=None):
    """Student (B, Cs, H, W) and teacher (B, Ct, H, W) on the CUDA device; tie-free patches for max pooling."""
    batch, cs, ct, height, width = shape
    s = unique_patch_maxima(randn((batch, cs, height, width), gen, dtype), gen, config or {})
    t = unique_patch_maxima(randn((batch, ct, height, width), gen, dtype), gen, config or {})
    return s.to(DEVICE), t.to(DEVICE)


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


def factor(n):
    """rows x cols = n with rows the largest divisor of n up to sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_block_boundaries(delta, gen):
    """THREADS - 1, THREADS and THREADS + 1 nodes (15 x 17, 16 x 16, 1 x 257), two images: the node kernels'
    blocks end inside an image, at its end, and one past it."""
    rows, cols = factor(THREADS + delta)
    compare_with_reference(window_loss, reference_loss, pair((2, 3, 2, rows, cols), gen), grad_inputs=(0, 1),
                           window=1)


def test_mixed_dtypes(gen):
    """A float16 student and a float32 teacher are widened to float32 (exactly); gradients keep each dtype."""
    s, t = pair((2, 4, 3, 6, 7), gen, torch.float32)
    compare_with_reference(window_loss, reference_loss, [s.half(), t], grad_inputs=(0, 1), dtype=torch.float16,
                           window=1, patch=(1, 2))


@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("channels_last", "strided")], ids=str)
def test_memory_layouts_and_teacher_gradient(layouts, gen):
    config = dict(window=1, patch=(2, 1), pool="max")
    s, t = pair((2, 6, 5, 7, 5), gen, torch.float32, config)
    inputs = [as_layout(s, layouts[0]), as_layout(t, layouts[1])]
    _, grads = compare_with_reference(window_loss, reference_loss, inputs, grad_inputs=(0, 1), **config)
    for x, grad in zip(inputs, grads):  # written into empty_like(x): the layout follows the input's
        assert grad.stride() == torch.empty_like(x).stride()


def test_gradient_reaches_only_the_inputs_that_require_it(gen):
    s, t = pair((1, 3, 4, 5, 6), gen)
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
    total, difference, s_norms, t_norms = FORWARD(*forward_args)
    assert total.dtype == difference.dtype == s_norms.dtype == torch.float64
    assert s_norms.shape == t_norms.shape == (1, 2 * 5)
    assert difference.shape == (1, 1 * 3 + 2, 2 * 5)  # offsets (0, 0), (0, 1) and (1, -1..1)
    grad_total = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    backward_args = (grad_total, as_layout(t.detach(), "strided"), t_norms, difference, 2, 1, False, 1, 1e-8, False,
                     -1.0)
    torch.library.opcheck(BACKWARD, backward_args)
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


@pytest.mark.parametrize("config", [dict(window=1, patch=2), dict(window=1, patch=2, pool="max"), dict(window=0)],
                         ids=str)
@pytest.mark.parametrize("which,value", [(0, float("nan")), (1, float("inf")), (0, float("-inf"))])
def test_non_finite_input_gives_nan(which, value, config, gen):
    inputs = list(pair((1, 3, 4, 5, 6), gen))
    inputs[which][0, 1, 2, 3] = value
    assert torch.isnan(window_loss(*inputs, **config))


def test_bitwise_reproducible(gen):
    s, t = pair((2, 7, 5, 17, 19), gen, torch.float32)  # several blocks per image

    def run():
        a, b = s.detach().requires_grad_(), t.detach().requires_grad_()
        loss = window_loss(a, b, window=2, patch=(1, 2))
        return (loss, *torch.autograd.grad(loss, (a, b)))

    assert all(torch.equal(x, y) for x, y in zip(run(), run()))


def test_near_convergence_float32(gen):
    """Teacher = student (1 + 1e-3 noise): the loss is a small difference of affinities that agree to ~1e-3,
    so float32 accumulation would leave ~1e-4 relative errors; the kernels accumulate in float64."""
    s, t = near_converged_pair((1, 16, 32, 32), gen)
    assert_relative_error_below(window_loss, reference_loss, s.to(DEVICE), t.to(DEVICE), 1e-4, window=2)


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


@pytest.mark.parametrize("config", [dict(window=1, patch=(2, 1), pool="max"), dict(window=2, detach_norm=True)],
                         ids=str)
def test_matches_triton(config, gen):
    """Both kernel backends are float64 inside: their D maps, norms, sums and gradients agree to rounding."""
    triton_kernels = helpers.triton_kernels("affinity_window", skip_module=False)
    s, t = pair((2, 5, 3, 7, 9), gen, torch.float32, config)
    s, t = s.to(helpers.TRITON_DEVICE), t.to(helpers.TRITON_DEVICE)
    full = PairwiseAffinityConfig.make(reduction="sum", **config)
    results = []
    for module in (kernels, triton_kernels):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        total = module.window_graph_sum(a, b, full)
        results.append((total, *torch.autograd.grad(total, (a, b))))
    for got, want in zip(*results):  # float64 totals; gradients in the inputs' float32, each rounded once
        assert got.dtype == want.dtype
        assert_close(got, want, got.dtype)
    ops = (FORWARD, torch.ops.fastkd.triton_affinity_window_forward.default)
    args = (s, t, 2, 1, True, 1, 1e-8, False)
    for got, want in zip(ops[0](*args), ops[1](*args)):
        assert got.shape == want.shape
        assert_close(got, want, torch.float64)
