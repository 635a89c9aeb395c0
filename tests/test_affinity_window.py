"""The ``affinity_window`` op, the windowed graph of ``PairwiseAffinityLoss(window=r)``, on every backend
(torch, triton, cuda, cpp) against the literal float64 reference (:mod:`fastkd.reference`), and the loss on
windows below the node grid through ``backend=``.

The op's sum ``sum_b sum_i sum_{j: cheb(i, j) <= r} (a_s_ij - a_t_ij)^2`` is taken through each backend's
``window_graph_sum`` (the implementation ``fastkd._backends.IMPLEMENTATIONS["affinity_window"]`` names), so
a window that covers the grid still runs the windowed kernels; the kernel backends' custom ops
(``torch.ops.fastkd_triton``, ``torch.ops.fastkd`` and ``torch.ops.fastkd_emulated``
``.affinity_window_forward`` / ``_backward``, one schema) are checked with ``torch.library.opcheck``.

Without a GPU, the Triton kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
tests/conftest.py) and the CUDA kernels through fastkd's CUDA emulator (FASTKD_EMULATE_CUDA=1, set by the
fixture), which also checks the shared memory for races and the barriers for divergence; the maps are small,
and the block-boundary cases are sized from each backend's block sizes (``helpers.BLOCKS``). The cpp backend
is the CUDA kernels' per-node math run by ``at::parallel_for`` on CPU tensors. Checks of one backend
(threads, the mixed-dtype widening, the compiled ops' argument checks, one kernel backend against another)
narrow the fixture by indirect parametrisation.
"""

import functools
import math

import pytest
import torch

import helpers
from fastkd import _backends, reference
from fastkd import functional as F
from fastkd.ops._common import result_dtype
from fastkd.ops._graph import node_grid, stored_half_window, window_pairs_1d
from fastkd.ops.pairwise_affinity_loss import PairwiseAffinityConfig, reduce_total
from helpers import (DTYPES, LargestTensor, as_layout, assert_close, assert_relative_error_below,
                     compare_with_reference, near_converged_pair, pair, randn)

backend = helpers.backend_fixture("torch", "triton", "cuda", "cpp")

KERNELS = ["triton", "cuda", "cpp"]  # the backends with custom ops
OP = "affinity_window"


def window_graph_sum(backend, device):
    """The backend's ``window_graph_sum(s, t, grid, window, eps, detach_norm)`` for tensors on ``device``."""
    return _backends.IMPLEMENTATIONS[OP][backend.name].load(device)


def window_loss(backend, s, t, patch=1, pool="avg", pool_scale=None, window=0, eps=1e-8, detach_norm=False,
                reduction="sum"):
    """The backend's windowed sum with the reference's signature: divided by the number of (b, i, j) terms
    for "mean" (:func:`reduce_total`), in the dtype the public loss returns."""
    config = PairwiseAffinityConfig.make(patch=patch, pool=pool, pool_scale=pool_scale, window=window, eps=eps,
                                         detach_norm=detach_norm, reduction=reduction)
    grid = node_grid(s.shape[2], s.shape[3], config.patch, config.pool, config.pool_scale)
    total = window_graph_sum(backend, s.device)(s, t, grid, window, eps, detach_norm)
    return reduce_total(total, config, s.shape[0], grid.grid_h, grid.grid_w).to(result_dtype(s, t))


def reference_loss(s, t, reduction="sum", **config):
    """The literal float64 reference (summed over (b, i, connected j) unless told otherwise)."""
    return reference.pairwise_affinity_loss(s, t, reduction=reduction, **config)


def loss_of(backend):
    return functools.partial(window_loss, backend)


def public_loss(backend):
    """``fastkd.functional.pairwise_affinity_loss`` with ``backend=`` this backend."""
    return functools.partial(F.pairwise_affinity_loss, backend=backend.name)


def loss_and_grads(backend, s, t, **config):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    loss = window_loss(backend, s, t, **config)
    return (loss, *torch.autograd.grad(loss, (s, t)))


# ----------------------------------------------------------------------------------- the op's windowed sum

# (config, (B, Cs, Ct, H, W)): windows 0-2, every pooling, detach_norm, odd grids, Cs != Ct.
CASES = [
    (dict(window=0, eps=0.5), (1, 5, 3, 4, 5)),  # only a_ii = (|f| / (|f| + eps))^2: needs a large eps
    (dict(window=1), (2, 5, 3, 7, 13)),
    (dict(window=2), (1, 4, 6, 6, 5)),
    (dict(window=1, patch=(2, 3), detach_norm=True), (1, 3, 5, 7, 11)),  # 4 x 4 nodes, partial patches
    (dict(window=2, patch=2, pool="max"), (1, 4, 3, 7, 8)),  # 4 x 4 nodes, partial patches
    (dict(window=1, pool_scale=0.3, detach_norm=True), (1, 3, 4, 10, 9)),  # 3 x 2 max patches, 4 x 5 nodes
]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,shape", CASES, ids=str)
def test_matches_reference(backend, config, shape, dtype, reduction, gen):
    compare_with_reference(loss_of(backend), reference_loss, backend.to(*pair(shape, gen, dtype, config)),
                           grad_inputs=(0, 1), reduction=reduction, **config)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_window_covering_the_grid(backend, reduction, gen):
    """r >= max(grid) - 1 (routed to the full graph by the loss) is still the windowed sum."""
    compare_with_reference(loss_of(backend), reference_loss, backend.to(*pair((1, 3, 4, 3, 4), gen)),
                           grad_inputs=(0, 1), window=5, reduction=reduction)


def factor(n):
    """rows x cols = n with rows the largest divisor of n up to sqrt(n)."""
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_block_boundaries(backend, delta, gen):
    """nodes - 1, nodes and nodes + 1 nodes per image (e.g. 15 x 17, 16 x 16, 1 x 257 for 256), two images:
    the node blocks end inside an image, at its end, and one past it; channel counts around the channel
    block where the kernels tile the channels (Triton)."""
    blocks = backend.blocks(OP)
    if backend.name == "triton":  # the table in helpers is the kernels' own
        from fastkd.ops.affinity_window import triton_backend

        assert (blocks["nodes"], blocks["channels"]) == (triton_backend.BLOCK_N, triton_backend.BLOCK_CHANNELS)
    rows, cols = factor(blocks["nodes"] + delta)
    channels = blocks["channels"]
    cs, ct = (channels + delta, channels - delta) if channels > 1 else (3, 2)
    compare_with_reference(loss_of(backend), reference_loss, backend.to(*pair((2, cs, ct, rows, cols), gen)),
                           grad_inputs=(0, 1), window=1)



@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("shape,config", [
    ((2, 3, 4, 3, 255), dict(window=1)),  # node rows of one tile less a node
    ((1, 4, 5, 2, 256), dict(window=2)),  # exactly one tile
    ((2, 5, 8, 3, 257), dict(window=1)),  # a tile and one node: the partner rows straddle the tiles
    ((1, 9, 2, 3, 513), dict(window=3)),  # three tiles a row; channel blocks of 4, 4 and 1
    ((2, 300, 2, 5, 40), dict(window=1)),  # many channels: backward tiles of 16 nodes
    ((1, 6, 3, 4, 514), dict(window=2, patch=(1, 2))),  # pooled nodes: 257 a row
    ((2, 3, 2, 4, 70), dict(window=1)),  # few channels: one backward tile of 70 nodes a row
], ids=str)
def test_cpp_tiles(backend, shape, config, gen):
    """The cpp kernels work on runs of kTileNodes nodes of one node row, kChannelBlock channels a pass (forward)
    and tiles of max(16, min(kTileNodes, 4096 / C)) nodes (backward): rows that end inside, at and past a tile,
    partners in the neighbouring tiles, channel counts around the block."""
    blocks = backend.blocks(OP)
    assert (blocks["nodes"], blocks["channels"]) == (256, 4)
    compare_with_reference(loss_of(backend), reference_loss, backend.to(*pair(shape, gen)), grad_inputs=(0, 1),
                           **config)


CUDA_TILES = helpers.BLOCKS[(OP, "cuda")]


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("shape,config", [
    # 9 x 33 nodes: two tile rows and columns, the second of each one node wide; chunk + 1 and chunk channels
    ((2, CUDA_TILES["chunk"] + 1, CUDA_TILES["chunk"], 9, 33), dict(window=1)),
    # exactly one tile; a teacher of gradient_channels + 1 channels (two gradient blocks, the second of one)
    ((1, 7, CUDA_TILES["gradient_channels"] + 1, CUDA_TILES["tile_rows"], CUDA_TILES["tile_cols"]),
     dict(window=2)),
    # 9 x 35 max-pooled nodes, partial patches; partners straddle tiles in both directions
    ((2, 4, 3, 17, 70), dict(window=2, patch=2, pool="max")),
    ((1, 5, 4, 17, 100), dict(window=1, patch=(2, 3), detach_norm=True)),  # 9 x 34 nodes, partial patches
    ((1, 3, 2, 5, 40), dict(window=3)),  # reach 3: the per-node kernels
    ((1, 3, 2, 2, 40), dict(window=2)),  # reaches 1 and 2 (two node rows): the per-node kernels
    ((1, 3, 2, 9, 40), dict(window=0, eps=0.5)),  # reach 0: the per-node kernels (a_ii alone: a large eps)
], ids=str)
def test_cuda_tiles(backend, shape, config, gen):
    """The cuda kernels of windows of reach 1 and 2 own tiles of tile_rows x tile_cols nodes, staging them and
    their halo chunk channels at a time, gradient_channels channels a gradient block; other reaches run one
    thread per node: grids that end inside, at and past a tile, channel counts around both blocks."""
    compare_with_reference(loss_of(backend), reference_loss, backend.to(*pair(shape, gen)), grad_inputs=(0, 1),
                           **config)


def test_mixed_dtypes(backend, gen):
    """A float16 student and a float32 teacher are widened to float32 (exactly); gradients keep each dtype."""
    s, t = pair((2, 4, 3, 6, 7), gen, torch.float32)
    compare_with_reference(loss_of(backend), reference_loss, backend.to(s.half(), t), grad_inputs=(0, 1),
                           dtype=torch.float16, window=1, patch=(1, 2))


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_dtypes_are_read_as_the_common_one(backend, dtypes, gen):
    """Each input is read in its own dtype and widened per element, exactly as widening it first would."""
    config = dict(window=1, patch=(1, 2))
    s, t = pair((2, 4, 3, 6, 7), gen, torch.float64)
    s, t = s.to(dtypes[0]), t.to(dtypes[1])
    common = torch.promote_types(*dtypes)
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, **config)
    expected, expected_s, expected_t = loss_and_grads(backend, s.to(common), t.to(common), **config)
    assert loss.dtype == expected.dtype and torch.equal(loss, expected)
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    assert_close(grad_s, expected_s, s.dtype)  # one rounding here, two (common dtype, then s's) there
    assert_close(grad_t, expected_t, t.dtype)
    coarser = max(dtypes, key=lambda d: torch.finfo(d).eps)
    assert_close(loss, reference_loss(s.double(), t.double(), **config), coarser)


@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("strided", "strided"),
                                     ("channels_last", "strided"), ("contiguous", "channels_last")], ids=str)
def test_memory_layouts_and_teacher_gradient(backend, layouts, gen):
    config = dict(window=1, patch=(2, 1), pool="max")
    s, t = pair((2, 6, 5, 7, 5), gen, torch.float32, config)
    inputs = backend.to(as_layout(s, layouts[0]), as_layout(t, layouts[1]))
    _, grads = compare_with_reference(loss_of(backend), reference_loss, inputs, grad_inputs=(0, 1), **config)
    for x, grad in zip(inputs, grads):
        assert grad.shape == x.shape
        if backend.name != "torch":  # written into empty_like(x): the layout follows the input's
            assert grad.stride() == torch.empty_like(x).stride()


def test_transposed_and_expanded_views(backend, gen):
    """Any strides: a transposed (H, W) view and a broadcast teacher (stride 0 along the batch)."""
    s = backend.to(randn((2, 3, 9, 8), gen, torch.float64))[0].transpose(2, 3)
    t = backend.to(randn((1, 2, 8, 9), gen, torch.float64))[0].expand(2, -1, -1, -1)
    compare_with_reference(loss_of(backend), reference_loss, [s, t], grad_inputs=(0, 1), window=2, patch=(1, 2))


def test_gradient_reaches_only_the_inputs_that_require_it(backend, gen):
    s, t = backend.to(*pair((1, 3, 4, 5, 6), gen))
    compare_with_reference(loss_of(backend), reference_loss, [s, t], grad_inputs=(1,), window=1)
    s.requires_grad_()
    window_loss(backend, s, t, window=1).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    s, t = s.detach(), t.requires_grad_()
    window_loss(backend, s, t, window=1).backward()
    assert s.grad is None and t.grad is not None and t.grad.abs().sum() > 0


# detach_norm=True is left out: its backward treats ||f|| as a constant, which is not the derivative
# gradcheck measures (test_matches_reference checks it against the reference, which detaches too).
@pytest.mark.parametrize("config,shape", [(dict(window=1), (1, 2, 3, 4, 5)),
                                          (dict(window=1, reduction="mean"), (1, 2, 3, 4, 5)),
                                          (dict(window=1, patch=2, pool="max"), (1, 2, 3, 6, 6)),
                                          (dict(window=2, patch=(2, 3)), (2, 2, 1, 5, 7))], ids=str)
def test_gradcheck(backend, config, shape, gen):
    s, t = backend.to(*pair(shape, gen, torch.float64, config))
    assert torch.autograd.gradcheck(lambda a, b: window_loss(backend, a, b, **config),
                                    (s.requires_grad_(), t.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_opcheck(backend, gen):
    forward, backward = backend.ops(OP)
    s, t = backend.to(*pair((1, 3, 2, 4, 5), gen))
    forward_args = (s.requires_grad_(), t.requires_grad_(), 2, 1, False, 1, 1e-8, False)
    torch.library.opcheck(forward, forward_args)
    torch.library.opcheck(forward, (as_layout(t.detach(), "channels_last"), as_layout(s.detach().float(), "strided"),
                                    2, 2, True, 3, 0.5, True))
    torch.library.opcheck(forward, (t.detach().half(), s.detach().bfloat16(), 1, 2, False, 2, 1e-8, False))
    total, difference, teacher_affinity, s_norms, t_norms = forward(*forward_args)
    assert total.dtype == difference.dtype == teacher_affinity.dtype == s_norms.dtype == torch.float64
    assert s_norms.shape == t_norms.shape == (1, 2 * 5)
    assert difference.shape == teacher_affinity.shape == (1, 1 * 3 + 2, 2 * 5)  # offsets (0, 0), (0, 1), (1, -1..1)
    grad_total = torch.tensor(0.5, dtype=torch.float64, device=s.device)
    # One backward per input: dL/dt (sign -1) of a strided teacher, dL/ds (sign +1) of a half student.
    backward_args = (grad_total, as_layout(t.detach(), "strided"), t_norms, difference, teacher_affinity, 2, 1, False,
                     1, 1e-8, False, -1.0)
    torch.library.opcheck(backward, backward_args)
    torch.library.opcheck(backward, (grad_total, as_layout(s.detach(), "channels_last").half(), s_norms, difference,
                                     teacher_affinity, 2, 1, False, 1, 1e-8, True, 1.0))
    assert backward(*backward_args).shape == t.shape


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
@pytest.mark.parametrize("shape", [(0, 3, 2, 4, 5), (2, 3, 2, 4, 0)], ids=str)
def test_empty_inputs(backend, shape, gen):
    """No image or no pixel: a zero total, shapes as the fake implementations give them."""
    forward, backward = backend.ops(OP)
    s, t = backend.to(*pair(shape, gen))
    forward_args = (s.requires_grad_(), t, 1, 1, False, 1, 1e-8, False)
    torch.library.opcheck(forward, forward_args)
    total, difference, teacher_affinity, s_norms, _ = forward(*forward_args)
    assert total.item() == 0 and difference.numel() == teacher_affinity.numel() == s_norms.numel() == 0
    grad = backward(torch.ones((), dtype=torch.float64, device=s.device), s.detach(), s_norms, difference,
                    teacher_affinity, 1, 1, False, 1, 1e-8, False, 1.0)
    assert grad.shape == s.shape


@pytest.mark.parametrize("backend", ["cpp", "cuda"], indirect=True)
def test_invalid_arguments_are_refused(backend):
    """The compiled ops' argument checks (csrc/affinity_window/affinity_window_glue.h)."""
    forward, backward = backend.ops(OP)
    s, t = backend.to(torch.zeros(1, 2, 5, 5), torch.zeros(1, 2, 5, 5))
    total, difference, teacher_affinity, norms, _ = forward(s, t, 1, 1, False, 1, 1e-8, False)
    grad_total = torch.tensor(1.0, dtype=torch.float64, device=s.device)
    with pytest.raises(RuntimeError, match="must share B, H and W"):
        forward(s, torch.zeros(1, 2, 5, 4, device=s.device), 1, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        forward(s[0], t[0], 1, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match="floating point"):
        forward(s.long(), t, 1, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match="kernel_h"):
        forward(s, t, 0, 1, False, 1, 1e-8, False)
    with pytest.raises(RuntimeError, match="window"):
        forward(s, t, 1, 1, False, -1, 1e-8, False)
    with pytest.raises(RuntimeError, match="difference"):
        backward(grad_total, s, norms, difference[:, :1], teacher_affinity, 1, 1, False, 1, 1e-8, False, 1.0)
    with pytest.raises(RuntimeError, match="teacher_affinity"):
        backward(grad_total, s, norms, difference, teacher_affinity[:, :1], 1, 1, False, 1, 1e-8, False, 1.0)
    with pytest.raises(RuntimeError, match="norms"):
        backward(grad_total, s, norms[:, :3], difference, teacher_affinity, 1, 1, False, 1, 1e-8, False, 1.0)
    with pytest.raises(RuntimeError, match="grad_total"):
        backward(torch.ones(2, dtype=torch.float64, device=s.device), s, norms, difference, teacher_affinity, 1, 1,
                 False, 1, 1e-8, False, 1.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("config", [dict(window=1, patch=2), dict(window=1, patch=2, pool="max"), dict(window=0)],
                         ids=str)
@pytest.mark.parametrize("which,value", [(0, float("nan")), (1, float("inf")), (0, float("-inf"))])
def test_non_finite_input_gives_nan(backend, which, value, config, gen):
    inputs = list(pair((1, 3, 4, 5, 6), gen))
    inputs[which][0, 1, 2, 3] = value
    assert torch.isnan(window_loss(backend, *backend.to(*inputs), **config))


TRITON_CHANNELS = helpers.BLOCKS[(OP, "triton")]["channels"]


@pytest.mark.parametrize("shape,config", [
    ((2, TRITON_CHANNELS + 2, TRITON_CHANNELS + 1, 4, 5), dict(window=1)),  # more than one channel block
    ((2, 7, 5, 17, 19), dict(window=2, patch=(1, 2))),  # several node blocks per image
], ids=str)
def test_bitwise_reproducible(backend, shape, config, gen):
    s, t = backend.to(*pair(shape, gen, torch.float32))
    first, second = loss_and_grads(backend, s, t, **config), loss_and_grads(backend, s, t, **config)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_bitwise_identical_for_any_number_of_threads(backend, gen):
    """1, 2 and 3 threads split the nodes differently (the maps are many parallel_for grains long); every
    output element and every block's partial sum is computed by one thread in a fixed order."""
    forward, _ = backend.ops(OP)
    s, t = randn((3, 6, 40, 44), gen), randn((3, 5, 40, 44), gen, torch.float16)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            outputs = forward(s, t, 1, 2, False, 2, 1e-8, False)
            runs.append((*outputs, *loss_and_grads(backend, s, t, window=2, patch=(1, 2)),
                         *loss_and_grads(backend, s, t, window=1, patch=2, pool="max", detach_norm=True)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_near_convergence_float32(backend, gen):
    """Teacher = student (1 + 1e-3 noise): the loss is a small difference of affinities that agree to ~1e-3,
    so float32 accumulation would leave ~1e-4 relative errors; every backend accumulates in float64."""
    s, t = backend.to(*near_converged_pair((1, 16, 32, 32), gen))
    assert_relative_error_below(loss_of(backend), reference_loss, s, t, 1e-4, window=2)


@pytest.mark.parametrize("backend,other", [("cuda", "triton"), ("cpp", "cuda")], indirect=["backend"], ids=str)
@pytest.mark.parametrize("config", [dict(window=1, patch=(2, 1), pool="max"), dict(window=2, detach_norm=True),
                                    dict(window=1, pool_scale=0.3)], ids=str)
def test_matches_the_other_kernels(backend, other, config, monkeypatch, gen):
    """The kernel backends are float64 inside and share the math: D maps, norms, sums and gradients agree to
    rounding (the sums are added in another order). cuda against triton on their device; cpp against the
    CUDA kernels run by the emulator on its CPU tensors."""
    if other == "triton":
        other = helpers.make_backend("triton", monkeypatch)
    else:
        monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
        other = helpers.Backend("cuda", torch.device("cpu"), True, "fastkd_emulated")
    s, t = backend.to(*pair((2, 5, 3, 7, 9), gen, torch.float32, config))
    results = [loss_and_grads(b, s, t, **config) for b in (backend, other)]
    for got, want in zip(*results):  # float64 totals; gradients in the inputs' float32, each rounded once
        assert got.dtype == want.dtype
        assert_close(got, want, got.dtype)
    args = (s, t, 2, 1, True, 1, 1e-8, False)
    for got, want in zip(backend.ops(OP)[0](*args), other.ops(OP)[0](*args)):
        assert got.shape == want.shape
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("backend", KERNELS, indirect=True)
def test_saves_only_the_inputs_norms_difference_and_teacher_affinity(backend, gen):
    s, t = backend.to(randn((2, 5, 16, 16), gen), randn((2, 5, 16, 16), gen))
    s.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = window_loss(backend, s, t, window=1)
    loss.backward()
    assert s.grad is not None
    largest_extra = max((x.numel() for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())), default=0)
    assert largest_extra <= 5 * 2 * 16 * 16  # the (B, half, m) difference and a_t, half = 5 for r = 1


def test_compiles_fullgraph_and_matches_eager(backend, gen):
    s, t = backend.to(*pair((2, 3, 4, 6, 7), gen, torch.float32))

    def doubled(a, b):
        return window_loss(backend, a, b, window=1, patch=(2, 1)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(doubled, fullgraph=True, backend="aot_eager")
    eager_inputs = (s.clone().requires_grad_(), t.clone().requires_grad_())
    compiled_inputs = (s.clone().requires_grad_(), t.clone().requires_grad_())
    expected, loss = doubled(*eager_inputs), compiled(*compiled_inputs)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(loss, compiled_inputs) + torch.autograd.grad(expected, eager_inputs)
    for got, want in zip(grads[:2], grads[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------- the loss, backend=..., on windows below the node grid

# The loss on every backend (these ran on the torch backend only before the tests were merged by op).
LOSS_CONFIGS = [
    dict(patch=4, window=1),
    dict(window=0, eps=0.5),  # only the diagonal a_ii = (|f| / (|f| + eps))^2: needs a large eps to be non-zero
    dict(window=1),
    dict(window=3, reduction="sum"),
    dict(pool_scale=0.3, window=1),
    dict(detach_norm=True, window=2, patch=2),
]
LOSS_SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 33, 17, 5, 5)]  # B, Cs, Ct, H, W


# Not triton: 72 cases of up to 7 s each under the interpreter; test_matches_reference checks the same
# kernels against the reference in every dtype, through the op.
@pytest.mark.parametrize("backend", ["torch", "cuda", "cpp"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=str)
def test_loss_matches_reference(backend, config, shape, dtype, gen):
    compare_with_reference(public_loss(backend), reference.pairwise_affinity_loss,
                           backend.to(*pair(shape, gen, dtype, config)), **config)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_loss_memory_layouts(backend, layout, gen):
    s, t = pair((2, 6, 5, 11, 7), gen, torch.float32)
    compare_with_reference(public_loss(backend), reference.pairwise_affinity_loss,
                           backend.to(as_layout(s, layout), as_layout(t, layout)), window=2)


def test_loss_gradient_reaches_teacher_only_when_it_requires_grad(backend, gen):
    s, t = backend.to(*pair((2, 4, 6, 5, 8), gen))
    compare_with_reference(public_loss(backend), reference.pairwise_affinity_loss, [s, t], grad_inputs=(0, 1),
                           window=1)
    s.requires_grad_()
    public_loss(backend)(s, t, window=1).backward()
    assert s.grad is not None and t.grad is None


# detach_norm=True is left out on purpose (see test_gradcheck); the full (not fast-mode) gradcheck. Not
# triton: one forward per input element takes minutes under the interpreter (test_gradcheck runs the same
# configurations on it in fast mode).
@pytest.mark.parametrize("backend", ["torch", "cuda", "cpp"], indirect=True)
@pytest.mark.parametrize("config", [dict(window=1), dict(patch=2, pool="max", window=1)], ids=str)
def test_loss_gradcheck(backend, config, gen):
    s, t = backend.to(*pair((2, 3, 4, 5, 6), gen, torch.float64, config))
    assert torch.autograd.gradcheck(lambda a, b: public_loss(backend)(a, b, **config),
                                    (s.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("window,rows,cols", [(0, 4, 5), (1, 1, 1), (2, 3, 9), (4, 5, 2)])
def test_window_term_count(window, rows, cols):
    expected = reference.affinity.window_matrix(rows, cols, window).sum().item()
    assert window_pairs_1d(rows, window) * window_pairs_1d(cols, window) == expected


# Post-ReLU zeros tie, so max pooling is left to the tie-free inputs above. Not triton: 64 x 64 maps take
# 80 s a case under the interpreter (test_near_convergence_float32 checks its float64 accumulation).
@pytest.mark.parametrize("backend", ["torch", "cuda", "cpp"], indirect=True)
@pytest.mark.parametrize("config", [dict(window=1), dict(window=3, patch=2)], ids=str)
def test_loss_near_convergence_float32(backend, config, gen):
    s, t = backend.to(*near_converged_pair((2, 48, 64, 64), gen))
    assert_relative_error_below(public_loss(backend), reference.pairwise_affinity_loss, s, t, 1e-4, **config)


@pytest.mark.parametrize("config", [dict(window=2), dict(patch=2, window=1)], ids=str)
def test_no_m_by_m_tensor_in_forward_or_backward(backend, config, gen):
    batch, channels, height, width = 2, 8, 64, 64
    s = backend.to(randn((batch, channels, height, width), gen))[0].requires_grad_()
    t = backend.to(randn((batch, channels + 3, height, width), gen))[0]
    with LargestTensor() as recorder:
        public_loss(backend)(s, t, **config).backward()
    largest = batch * (channels + 3) * height * width  # O(B C m), never m x m = 16.7M
    if backend.name != "torch":  # and the kernels' (B, half, m) D map: half = 13 offsets for r = 2
        grid = node_grid(height, width, PairwiseAffinityConfig.make(**config).patch, "avg", None)
        largest = max(largest, batch * stored_half_window(config["window"], grid.grid_h, grid.grid_w) * grid.nodes)
    assert recorder.largest <= largest
