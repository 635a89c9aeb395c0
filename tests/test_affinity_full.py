"""The ``affinity_full`` op: ``PairwiseAffinityLoss`` on a full graph (no window, or one spanning the node grid)
and ``AffinityDistillationLoss``, on every backend (torch, triton, cuda, cpp), against the literal float64
reference, on both algorithms (Gram identity and direct tiles). The cpp backend is the torch backend's sums on
nodes pooled by compiled C++ (``fastkd::pool_nodes_*``, tested on its own at the end).

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors and the CUDA kernels under
fastkd's CUDA emulator (FASTKD_EMULATE_CUDA=1), so the maps are small; node and channel counts straddle
each backend's block size (``helpers.BLOCKS``: Triton programs of 32 nodes x 32 channels, CUDA tiles of
16 x 16, and the CUDA Gram and apply kernels' tiles of 64 channels and 64 nodes, the Gram staging 32 nodes
at a time). The windowed graph is tested in test_affinity_window.py.
"""

import functools
import pathlib

import pytest
import torch

import fastkd
import helpers
from fastkd import functional as F
from fastkd import reference
from fastkd.ops import _graph
from fastkd.ops.affinity_full import torch_backend
from fastkd.reference import affinity
from helpers import (DTYPES, TOLERANCES, LargestTensor, as_layout, assert_relative_error_below,
                     compare_with_reference, near_converged_pair, pair, randn)

ALGORITHMS = ["gram", "direct"]

backend = helpers.backend_fixture("torch", "triton", "cuda", "cpp")
torch_only = pytest.mark.parametrize("backend", ["torch"], indirect=True)
torch_and_cpp = pytest.mark.parametrize("backend", ["torch", "cpp"], indirect=True)
kernels_only = pytest.mark.parametrize("backend", ["triton", "cuda"], indirect=True)


def pairwise(backend, s, t, **config):
    return fastkd.PairwiseAffinityLoss(backend=backend.name, **config)(s, t)


def distillation(backend, s, t, **config):
    return fastkd.AffinityDistillationLoss(backend=backend.name, **config)(s, t)


def block_edges(backend, algorithm):
    """(B, Cs, Ct, H, W): node counts and channel counts block - 1, block, block + 1, and two nodes.
    (With one node only a_11 = (|f| / (|f| + eps))^2 ~ 1 - 2 eps / |f| exists, and its ~1e-14 loss is
    below the Gram identity's float64 rounding of terms of size 1.) The torch backend has no blocks: it
    takes the Triton kernels' sizes. The CUDA Gram kernel has blocks of its own."""
    blocks = helpers.BLOCKS[("affinity_full", "cuda" if backend.name == "cuda" else "triton")]
    prefix = "gram_" if algorithm == "gram" and "gram_nodes" in blocks else ""
    n, c = blocks[prefix + "nodes"], blocks[prefix + "channels"]
    return [(1, c - 1, c + 1, 1, n - 1), (2, c, 3, 4, n // 4), (1, c + 1, c, 1, n + 1), (2, 2, 1, 1, 2)]


def reference_config(config):
    """The reference takes every argument but ``algorithm`` (both algorithms compute the same loss)."""
    return {key: value for key, value in config.items() if key != "algorithm"}


def check_pairwise(backend, inputs, grad_inputs=(0,), **config):
    compare_with_reference(lambda a, b, **c: pairwise(backend, a, b, **config),
                           lambda a, b, **c: reference.pairwise_affinity_loss(a, b, **reference_config(config)),
                           backend.to(*inputs), grad_inputs)


def check_distillation(backend, inputs, grad_inputs=(0,), **config):
    compare_with_reference(lambda a, b, **c: distillation(backend, a, b, **config),
                           lambda a, b, **c: reference.affinity_distillation_loss(a, b, **reference_config(config)),
                           backend.to(*inputs), grad_inputs)


# ------------------------------------------------------------------------ every backend against the reference

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_matches_reference_in_every_dtype(backend, algorithm, dtype, gen):
    check_pairwise(backend, pair((2, 5, 3, 7, 13), gen, dtype), algorithm=algorithm)


PAIRWISE_CONFIGS = [
    dict(patch=2),
    dict(patch=(3, 2), pool="max"),
    dict(pool_scale=0.5),
    dict(detach_norm=True, patch=(2, 3)),
    dict(detach_norm=True, patch=2, pool="max"),
    dict(eps=1e-2, reduction="sum"),
    dict(window=50),  # spans the grid: the full graph
]


@pytest.mark.parametrize("config", PAIRWISE_CONFIGS, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_configurations(backend, config, algorithm, gen):
    check_pairwise(backend, pair((2, 6, 4, 9, 10), gen, torch.float32, config), algorithm=algorithm, **config)


def test_triton_block_sizes_are_the_kernels():
    from fastkd.ops.affinity_full import triton_backend

    blocks = helpers.BLOCKS[("affinity_full", "triton")]
    assert (blocks["nodes"], blocks["channels"], blocks["gram_nodes"], blocks["gram_channels"]) == (
        triton_backend.BLOCK_NODES, triton_backend.BLOCK_CHANNELS, triton_backend.BLOCK_NODES,
        triton_backend.GRAM_CHANNELS)
    assert triton_backend.APPLY_ROWS == triton_backend.GRAM_CHANNELS  # the Gram edges straddle the apply's rows
    assert (blocks["few_nodes"], blocks["direct_side"]) == (triton_backend.FEW_NODES, triton_backend.DIRECT_ROWS)


@pytest.mark.parametrize("edge", range(4))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_block_boundaries(backend, edge, algorithm, gen):
    check_pairwise(backend, pair(block_edges(backend, algorithm)[edge], gen, torch.float32), algorithm=algorithm)


# (B, Cs, Ct, H, W), config, and where the node count lies: (bound, offset), nodes an image for few_nodes and in
# all for split_nodes
FEW_NODES = [
    ((2, 33, 17, 8, 8), dict(algorithm="direct"), ("few_nodes", 0)),  # D formed whole, channels split over blocks
    ((1, 5, 3, 5, 13), dict(algorithm="direct"), ("few_nodes", 1)),  # a block per 64 rows
    ((2, 3, 2, 64, 64), dict(algorithm="gram"), ("split_nodes", 0)),  # one thread or program sums a node
    ((2, 40, 2, 63, 65), dict(algorithm="gram"), ("split_nodes", -2)),  # a warp, or programs, share a node
    ((2, 40, 2, 63, 65), dict(algorithm="gram", detach_norm=True), ("split_nodes", -2)),
    ((2, 40, 20, 33, 33), dict(pool_scale=0.5), ("few_nodes", -55)),  # pool_scale's 9 nodes, of 16 x 16 pixels
]


@kernels_only
@pytest.mark.parametrize("shape, config, bound", FEW_NODES, ids=str)
def test_few_nodes(backend, shape, config, bound, gen):
    """Few nodes spread over the GPU: up to few_nodes nodes an image the direct path splits the channels over
    blocks or programs, and below split_nodes nodes in all so do the node reductions (in CUDA, 32 warps share 32 nodes);
    both sides of both bounds. 40 channels: Triton's splits of 32 end inside a block."""
    name, offset = bound
    batch, _, _, height, width = shape
    nodes = _graph.node_grid(height, width, (1, 1), "avg", config.get("pool_scale")).nodes
    assert nodes * (batch if name == "split_nodes" else 1) == backend.blocks("affinity_full")[name] + offset
    check_pairwise(backend, pair(shape, gen, torch.float32, config), grad_inputs=(0, 1), **config)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("width_offset", [-1, 0, 19])  # 19: wider than a warp's 32 lanes
def test_cuda_wide_patches(backend, pool, width_offset, gen):
    """From wide_patch pixels wide a warp pools a channel of a node, its lanes along the patch's rows; the last
    column and row of patches are cut short by the map's edge, and a non-finite pixel still gives NaN."""
    patch = (3, backend.blocks("affinity_full")["wide_patch"] + width_offset)
    width = 2 * patch[1] + 5
    config = dict(patch=patch, pool=pool)
    s, t = pair((2, 6, 5, 2 * patch[0] + 1, width), gen, torch.float32, config)
    check_pairwise(backend, (s, t), grad_inputs=(0, 1), **config)
    for bad in (float("nan"), float("-inf")):
        s_bad, t_device = backend.to(s.detach().clone(), t)
        s_bad[1, 4, 2, patch[1] + 3] = bad
        assert torch.isnan(pairwise(backend, s_bad, t_device, **config))


@pytest.mark.parametrize("backend", ["cuda", "triton"], indirect=True)
@pytest.mark.parametrize("shape, tiles", [((1, 5, 3, 8, 16), (2, 0)), ((2, 17, 19, 9, 21), (2, 61)),
                                          ((1, 33, 3, 16, 32), (8, 0))], ids=str)
def test_direct_row_tiles(backend, shape, tiles, gen):
    """The direct path's forward above few_nodes: tiles of D direct_side rows (in CUDA direct_side nodes
    square, on FP64 tensor-core products; whole tiles, and a partial one), in CUDA column tiles split over
    blocks (one a split for B = 1 at 8 tiles), per-row terms too."""
    _, _, _, height, width = shape
    assert divmod(height * width, backend.blocks("affinity_full")["direct_side"]) == tiles
    inputs = pair(shape, gen, torch.float32)
    check_pairwise(backend, inputs, grad_inputs=(0, 1), algorithm="direct")
    check_distillation(backend, inputs, grad_inputs=(0, 1), algorithm="direct")


@pytest.mark.parametrize("backend", ["cuda", "triton"], indirect=True)
@pytest.mark.parametrize("shape, slabs", [((1, 5, 3, 9, 21), (64, 2, 61)), ((2, 70, 40, 10, 10), (64, 1, 36)),
                                          ((1, 3, 130, 12, 13), (128, 1, 28))], ids=str)
def test_direct_backward_slabs(backend, shape, slabs, gen):
    """The direct backward forms W = 2 (w_i + w_j) D a slab of rows at a time (Triton's slab_rows_for, and the
    same rule in the CUDA glue's affinity_full_slab_rows: whole tiles of direct_side rows, no more rows than
    max(Cs, Ct), at least one tile): whole slabs and a partial last one, for both gradients."""
    from fastkd.ops.affinity_full import triton_backend

    _, cs, ct, height, width = shape
    rows = triton_backend.slab_rows_for(height * width, max(cs, ct))
    assert (rows, *divmod(height * width, rows)) == slabs
    inputs = pair(shape, gen, torch.float32)
    check_pairwise(backend, inputs, grad_inputs=(0, 1), algorithm="direct")
    check_distillation(backend, inputs, grad_inputs=(0, 1), algorithm="direct")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distillation_matches_reference_in_every_dtype(backend, algorithm, dtype, gen):
    check_distillation(backend, pair((2, 5, 3, 7, 13), gen, dtype), algorithm=algorithm)


def resolved_rows_pair(shape, gen, dtype):
    """``pair``, drawn again while a row of ``A_s - A_t`` lies within the Gram path's float64 rounding noise
    (``torch_backend.drop_rounding_noise`` sets such rows to 0, with no gradient). The gradient of the row norm
    ``||A_s[i,:] - A_t[i,:]||`` is the unit direction of that difference, whatever its size, so a row the Gram
    cannot resolve loses a gradient the reference keeps. Two nodes with one teacher channel (a_t = +-1) meet
    such a row in about 1 draw of 5000 (the bound below, 50x the noise, redraws 1 in 300); three or more
    nodes practically never."""
    for _ in range(100):
        s, t = pair(shape, gen, dtype)
        a_s, a_t = (affinity.affinity_matrix(affinity.normalize(x.double().flatten(2), 1e-8)) for x in (s, t))
        if torch.linalg.vector_norm(a_s - a_t, dim=2).min() > 1e-5 * a_s.shape[1] ** 0.5:  # noise: ~2e-7 sqrt(m)
            return s, t
    raise AssertionError(f"no pair of shape {shape} with resolved rows in 100 draws")


@pytest.mark.parametrize("edge", range(4))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distillation_block_boundaries(backend, edge, algorithm, gen):
    check_distillation(backend, resolved_rows_pair(block_edges(backend, algorithm)[edge], gen, torch.float32),
                       algorithm=algorithm, reduction="sum")


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_memory_layouts(backend, layout, algorithm, gen):
    config = dict(patch=2, pool="max")  # the tie-free patches must be the pooled ones
    s, t = pair((2, 6, 5, 11, 7), gen, torch.float32, config)
    s, t = as_layout(s, layout), as_layout(t, layout)
    check_pairwise(backend, [s, t], algorithm=algorithm, **config)
    check_distillation(backend, [s, t], algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_teacher_gradient(backend, algorithm, gen):
    s, t = pair((2, 4, 6, 5, 8), gen, torch.float64)
    check_pairwise(backend, [s, t], grad_inputs=(0, 1), algorithm=algorithm, patch=2)
    check_distillation(backend, [s, t], grad_inputs=(0, 1), algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradcheck(backend, algorithm, gen):
    """float64 finite differences; fast mode (a random projection of the Jacobian) keeps the interpreter's
    share of the O(numel) forward evaluations small."""
    s, t = backend.to(*pair((2, 3, 2, 3, 4), gen, torch.float64))
    inputs = (s.requires_grad_(), t.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: pairwise(backend, a, b, algorithm=algorithm, patch=(1, 2)), inputs,
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: distillation(backend, a, b, algorithm=algorithm), inputs,
                                    fast_mode=True)


def test_gram_and_direct_agree_and_the_cost_model_picks_the_same_path_everywhere(backend, gen):
    s, t = backend.to(*pair((2, 40, 24, 3, 3), gen, torch.float64))
    gram, direct = (pairwise(backend, s, t, algorithm=a) for a in ALGORITHMS)
    torch.testing.assert_close(gram, direct, rtol=1e-10, atol=0)
    assert not _graph.use_gram(9, 40, 24)  # auto takes the direct path here ...
    assert torch.equal(pairwise(backend, s, t), direct)
    s, t = backend.to(*pair((1, 3, 2, 6, 7), gen, torch.float64))
    assert _graph.use_gram(42, 3, 2)  # ... and the Gram path here
    assert torch.equal(pairwise(backend, s, t), pairwise(backend, s, t, algorithm="gram"))


# auto: the Gram path, the direct path; (2, 3, 7, 10): 70 nodes, past few_nodes, in 64 x 64 tiles of D in CUDA
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 64, 2, 2), (2, 3, 7, 10)], ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS + ["auto"])
def test_identical_rows_give_zero_distillation_loss_and_gradient(backend, algorithm, shape, gen):
    s = randn(shape, gen, torch.float64).to(backend.device)
    t = s.clone()
    t[0] += randn(shape[1:], gen, torch.float64).to(backend.device)  # image 0 differs, image 1 is identical
    s.requires_grad_()
    (grad,) = torch.autograd.grad(distillation(backend, s, t, algorithm=algorithm), s)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros_like(grad[1]))
    same = s.detach().clone().requires_grad_()
    zero = distillation(backend, same, same.detach(), algorithm=algorithm)
    zero.backward()
    assert zero.item() == 0 and torch.equal(same.grad, torch.zeros_like(same.grad))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_finite_input_gives_nan(backend, bad, algorithm, gen):
    s, t = backend.to(*pair((2, 3, 4, 5, 6), gen, torch.float32))
    s[1, 2, 3, 4] = bad
    assert torch.isnan(pairwise(backend, s, t, algorithm=algorithm))
    assert torch.isnan(pairwise(backend, s, t, algorithm=algorithm, patch=2, pool="max"))
    assert torch.isnan(distillation(backend, s, t, algorithm=algorithm))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_results_are_bitwise_reproducible(backend, algorithm, gen):
    s, t = backend.to(*pair((2, 7, 5, 9, 8), gen, torch.float32))
    runs = []
    for _ in range(2):
        x = s.clone().requires_grad_()
        loss = pairwise(backend, x, t, algorithm=algorithm) + distillation(backend, x, t, algorithm=algorithm)
        runs.append((loss, *torch.autograd.grad(loss, x)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("loss,reference_fn", [(pairwise, reference.pairwise_affinity_loss),
                                               (distillation, reference.affinity_distillation_loss)],
                         ids=["pairwise", "distillation"])
def test_near_convergence_float32(backend, loss, reference_fn, gen):
    """Teacher = student (1 + 1e-3 noise), correlated post-ReLU features: the Gram terms cancel to ~1e-6
    of their size, and the float64 accumulation keeps the loss and gradient to 1e-4 of the reference."""
    s, t = backend.to(*near_converged_pair((1, 16, 48, 48), gen))
    assert_relative_error_below(lambda a, b: loss(backend, a, b), reference_fn, s, t, 1e-4)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float64)], ids=str)
@kernels_only
def test_mixed_dtype_pairs_match_the_torch_backend(backend, dtypes, gen):
    """Student and teacher in different dtypes: each pointer is read in its own dtype, gradients come back in
    the student's."""
    s = randn((2, 5, 7, 9), gen, dtypes[0]).to(backend.device)
    t = randn((2, 3, 7, 9), gen, dtypes[1]).to(backend.device)
    for loss in (fastkd.PairwiseAffinityLoss, fastkd.AffinityDistillationLoss, fastkd.ConsistencyLoss):
        results = []
        for name in (backend.name, "torch"):
            x = s.clone().requires_grad_()
            value = loss(backend=name)(x, t)
            results.append((value, *torch.autograd.grad(value, x)))
        (value, value_grad), (expected, expected_grad) = results
        assert value.dtype == expected.dtype and value_grad.dtype == dtypes[0]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
        # both round the same float64 gradient to the student dtype (the interpreter truncates to bfloat16)
        torch.testing.assert_close(value_grad.double(), expected_grad.double(), rtol=0,
                                   atol=2 * TOLERANCES[dtypes[0]][1] * expected_grad.abs().max().item())


# ------------------------------------------------------------------------------ the kernel backends' custom ops

@pytest.mark.parametrize("use_gram", [True, False])
@pytest.mark.parametrize("per_row", [True, False])
@kernels_only
def test_custom_ops_pass_opcheck(backend, use_gram, per_row, gen):
    forward_op, backward_op = backend.ops("affinity_full")
    s, t = backend.to(*pair((2, 3, 4, 3, 5), gen, torch.float32))
    grid = tuple(_graph.node_grid(3, 5, (1, 2), "max", None))
    args = (s.requires_grad_(), t, *grid, 1e-8, use_gram, per_row, False)
    torch.library.opcheck(forward_op, args)
    forward = forward_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_terms = torch.rand_like(forward[0])
    torch.library.opcheck(backward_op,
                          (grad_terms, s.detach(), t, *forward[1:], *grid, 1e-8, use_gram, False, True, True))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_m_by_m_tensor_in_the_triton_kernels_forward_or_backward(backend, algorithm, gen):
    """Every tensor the Triton custom ops allocate is at most O(B C m): the largest, in bytes, is one float64
    (B, Ct, m) buffer or, on the direct path, a backward slab of D's rows no larger (slab_rows_for: at least one
    tile of DIRECT_ROWS rows); m x m would be 4.2M elements here. (Bytes, because the Triton interpreter views its
    arguments as uint8 tensors. The CUDA ops allocate inside C++, out of a dispatch mode's sight.)"""
    from fastkd.ops.affinity_full import triton_backend

    s, t = randn((1, 8, 32, 64), gen).to(backend.device), randn((1, 11, 32, 64), gen).to(backend.device)
    grid = _graph.node_grid(32, 64, (1, 1), "avg", None)
    use_gram = algorithm == "gram"
    if not use_gram:  # the direct kernels are O(m^2 C) work: keep the interpreter's share small
        s, t, grid = s[..., :8, :].clone(), t[..., :8, :].clone(), _graph.node_grid(8, 64, (1, 1), "avg", None)
    with LargestTensor() as recorder:
        forward = triton_backend.affinity_full_forward._init_fn(s, t, *grid, 1e-8, use_gram, True, False)
        triton_backend.affinity_full_backward._init_fn(torch.ones_like(forward[0]), s, t, *forward[1:], *grid, 1e-8,
                                                       use_gram, False, True, True)
    rows = t.shape[1] if use_gram else max(t.shape[1], triton_backend.DIRECT_ROWS)
    assert 0 < recorder.largest_bytes <= rows * grid.nodes * 8


def test_compiles_without_graph_breaks(backend, gen):
    s, t = backend.to(*pair((2, 4, 3, 6, 5), gen, torch.float32))

    def losses(a, b):
        return pairwise(backend, a, b, patch=2) + distillation(backend, a, b, algorithm="direct")

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    expected, actual = losses(x, t), compiled(y, t)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(actual, y)[0], torch.autograd.grad(expected, x)[0],
                               rtol=1e-6, atol=1e-9)


def test_the_notes_table_is_current():
    """NOTES.md quotes the FLOP/byte table of fastkd.ops.costs verbatim."""
    from fastkd.ops import costs

    notes = pathlib.Path(costs.__file__).with_name("NOTES.md")
    assert notes.exists(), "NOTES.md must be installed with the package"
    assert costs.table() in notes.read_text()


# --------------------------------------------------------------------- the torch backend and the loss modules

FULL_GRAPH_CONFIGS = [
    dict(),
    dict(patch=2),
    dict(patch=(3, 2), pool="max"),
    dict(window=50),  # covers the whole grid: the full graph
    dict(pool_scale=0.5),
    dict(detach_norm=True),
    dict(eps=1e-2, reduction="sum"),
]
SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 33, 17, 5, 5)]  # B, Cs, Ct, H, W


def pairwise_function(backend):
    """``F.pairwise_affinity_loss`` on ``backend``."""
    return functools.partial(F.pairwise_affinity_loss, backend=backend.name)


@torch_and_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", FULL_GRAPH_CONFIGS, ids=str)
def test_pairwise_matches_reference(backend, config, shape, dtype, gen):
    compare_with_reference(pairwise_function(backend), reference.pairwise_affinity_loss,
                           pair(shape, gen, dtype, config), **config)


@torch_and_cpp
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("config", [dict(), dict(patch=3, pool="max"), dict(patch=(2, 3))], ids=str)
def test_pairwise_memory_layouts(backend, config, layout, gen):
    s, t = pair((2, 6, 5, 11, 7), gen, torch.float32, config)
    compare_with_reference(pairwise_function(backend), reference.pairwise_affinity_loss,
                           [as_layout(s, layout), as_layout(t, layout)], **config)


@torch_only
def test_pairwise_gradient_reaches_teacher_only_when_it_requires_grad(backend, gen):
    s, t = pair((2, 4, 6, 5, 8), gen, torch.float64)
    compare_with_reference(F.pairwise_affinity_loss, reference.pairwise_affinity_loss, [s, t], grad_inputs=(0, 1))
    s.requires_grad_()
    F.pairwise_affinity_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


# detach_norm=True is left out on purpose: its backward treats ||f|| as a constant, so it is not the
# derivative gradcheck measures (test_pairwise_matches_reference checks it against the reference, which
# detaches too).
@torch_and_cpp
@pytest.mark.parametrize("config", [dict(), dict(pool_scale=0.5), dict(patch=(2, 3), reduction="sum"),
                                    dict(patch=(3, 2), pool="max")], ids=str)
def test_pairwise_gradcheck(backend, config, gen):
    s, t = pair((2, 3, 4, 5, 6), gen, torch.float64, config)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_function(backend)(a, b, **config),
                                    (s.requires_grad_(), t.requires_grad_()))


# (nodes per chunk, images per chunk) of the Gram path for a batch of 3 images of m nodes: node by node; m - 1
# nodes (a chunk of one node left over) and images 2 + 1; whole images one at a time.
CHUNK_PLANS = {"node-by-node": lambda m: (1, 3), "m-1-nodes-2-images": lambda m: (max(m - 1, 1), 2),
               "one-image": lambda m: (m, 1)}


@torch_only
@pytest.mark.parametrize("plan", CHUNK_PLANS)
@pytest.mark.parametrize("cs,ct,height,width", [(4, 6, 1, 5), (3, 3, 5, 8), (64, 48, 3, 3), (8, 8, 10, 20)], ids=str)
@pytest.mark.parametrize("config", [dict(), dict(patch=(2, 1), detach_norm=True)], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["image", "per_row"])
def test_gram_and_direct_terms_agree_across_chunks(backend, per_row, config, cs, ct, height, width, plan, monkeypatch,
                                                    gen):
    """The Gram path walks the nodes in chunks, sums in float64 chunk by chunk, and writes the gradients chunk by
    chunk: with chunk boundaries inside an image and between images, terms and both gradients match the direct
    path (the m x m difference, differentiated by autograd)."""
    grid = _graph.node_grid(height, width, config.get("patch", (1, 1)), "avg", None)
    nodes_per_chunk, images_per_chunk = CHUNK_PLANS[plan](grid.nodes)
    monkeypatch.setattr(torch_backend, "MIN_CHUNK_NODES", nodes_per_chunk)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", images_per_chunk * (cs + ct) * nodes_per_chunk)
    monkeypatch.setattr(torch_backend, "MAX_CHUNKS", 1 << 30)
    chunks = torch_backend.chunks(3, cs + ct, grid.nodes)
    assert len(chunks) == -(-3 // images_per_chunk) * -(-grid.nodes // nodes_per_chunk)
    s, t = randn((3, cs, height, width), gen, torch.float64), randn((3, ct, height, width), gen, torch.float64)
    results = []
    for use_gram in (True, False):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        terms = torch_backend.full_graph_terms(a, b, grid, 1e-8, config.get("detach_norm", False), use_gram, per_row)
        weights = torch.rand(terms.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        results.append((terms, *torch.autograd.grad((terms * weights).sum(), (a, b))))
    (terms, grad_s, grad_t), (expected, expected_s, expected_t) = results
    torch.testing.assert_close(terms, expected, rtol=1e-10 if per_row else 1e-12, atol=1e-13 if per_row else 0)
    for grad, expected_grad in ((grad_s, expected_s), (grad_t, expected_t)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12 * expected_grad.abs().max().item())


@pytest.mark.parametrize("batch,channels,nodes", [(2, 128, 131072), (1, 7, 5), (3, 1024, 300), (64, 16, 4096)])
def test_gram_chunks_cover_every_node_once_in_a_bounded_number_of_chunks(batch, channels, nodes):
    plan = torch_backend.chunks(batch, channels, nodes)
    covered = torch.zeros(batch, nodes, dtype=torch.int64)
    for images, span in plan:
        covered[images, span] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    assert len(plan) <= max(torch_backend.MAX_CHUNKS, -(-nodes // torch_backend.MIN_CHUNK_NODES) * batch)
    budget = max(torch_backend.CHUNK_ELEMENTS, batch * channels * nodes // torch_backend.MAX_CHUNKS + 1)
    for images, span in plan:  # within the budget, or one image of MIN_CHUNK_NODES nodes
        size = (images.stop - images.start) * channels * (span.stop - span.start)
        assert size <= max(budget, channels * torch_backend.MIN_CHUNK_NODES)


@torch_only
@pytest.mark.parametrize("loss", [F.pairwise_affinity_loss, F.affinity_distillation_loss],
                         ids=["pairwise", "distillation"])
def test_gram_path_makes_no_float64_copy_of_the_input(backend, loss, gen):
    """The Gram path widens the nodes to float64 a chunk at a time: no tensor of forward or backward, in bytes,
    exceeds the float32 input (or its float32 gradient); a float64 copy of the input would be twice that."""
    s, t = near_converged_pair((2, 16, 128, 256), gen)
    assert _graph.use_gram(128 * 256, 16, 16)
    s.requires_grad_()
    with LargestTensor() as recorder:
        (grad,) = torch.autograd.grad(loss(s, t), s)
    assert grad.dtype == torch.float32
    assert 0 < recorder.largest_bytes <= s.numel() * s.element_size()


def test_cost_model_prefers_direct_for_few_nodes_and_gram_for_many():
    assert not _graph.use_gram(9, 512, 512)  # pool_scale=0.5 on a 65x65 map: 3x3 nodes
    assert _graph.use_gram(65 * 65, 512, 512)
    assert _graph.use_gram(16384, 19, 19)


# Max pooling is checked on tie-free inputs above: post-ReLU zeros tie, and tied maxima have many valid
# subgradients (torch's max_pool2d picks one element, the reference's amax splits evenly).
@torch_and_cpp
@pytest.mark.parametrize("loss,reference_fn,config", [
    (F.pairwise_affinity_loss, reference.pairwise_affinity_loss, dict()),
    (F.pairwise_affinity_loss, reference.pairwise_affinity_loss, dict(patch=4)),
    (F.affinity_distillation_loss, reference.affinity_distillation_loss, dict()),
], ids=["pairwise", "pairwise-patch4", "distillation"])
def test_near_convergence_float32_64x64(backend, loss, reference_fn, config, gen):
    s, t = near_converged_pair((2, 48, 64, 64), gen)
    assert_relative_error_below(functools.partial(loss, backend=backend.name), reference_fn, s, t, 1e-4, **config)


@torch_only
@pytest.mark.parametrize("loss,reference_fn", [(F.pairwise_affinity_loss, reference.pairwise_affinity_loss),
                                               (F.affinity_distillation_loss, reference.affinity_distillation_loss)],
                         ids=["pairwise", "distillation"])
def test_near_convergence_float32_m16384(backend, loss, reference_fn, gen):
    s, t = near_converged_pair((1, 32, 128, 128), gen)
    assert_relative_error_below(loss, reference_fn, s, t, 1e-4)


@torch_only
@pytest.mark.parametrize("loss", [F.pairwise_affinity_loss, F.affinity_distillation_loss],
                         ids=["pairwise", "distillation"])
def test_no_m_by_m_tensor_in_forward_or_backward(backend, loss, gen):
    batch, channels, height, width = 2, 8, 64, 64
    s = randn((batch, channels, height, width), gen).requires_grad_()
    t = randn((batch, channels + 3, height, width), gen)
    with LargestTensor() as recorder:
        loss(s, t).backward()
    # O(B C m), never m x m = 16.7M: at most a Gram-path chunk of student and teacher channels together
    assert recorder.largest <= batch * (2 * channels + 3) * height * width


DISTILLATION_SHAPES = [(1, 5, 3, 7, 13), (3, 4, 4, 9, 6), (2, 40, 24, 3, 3), (2, 2, 2, 1, 3)]  # B, Cs, Ct, H, W


@torch_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DISTILLATION_SHAPES, ids=str)
@pytest.mark.parametrize("config", [dict(), dict(reduction="sum"), dict(eps=1e-2)], ids=str)
def test_distillation_matches_reference(backend, config, shape, dtype, gen):
    batch, cs, ct, height, width = shape
    inputs = [randn((batch, cs, height, width), gen, dtype), randn((batch, ct, height, width), gen, dtype)]
    compare_with_reference(F.affinity_distillation_loss, reference.affinity_distillation_loss, inputs, **config)


@torch_only
def test_distillation_gradcheck(backend, gen):
    s = randn((2, 3, 4, 5), gen, torch.float64).requires_grad_()
    t = randn((2, 5, 4, 5), gen, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(F.affinity_distillation_loss, (s, t))


def test_modules_match_functions_and_describe_themselves(gen):
    s, t = pair((2, 4, 5, 6, 7), gen, torch.float32)
    module = fastkd.PairwiseAffinityLoss(patch=2, window=1, reduction="sum")
    assert torch.equal(module(s, t), F.pairwise_affinity_loss(s, t, patch=2, window=1, reduction="sum"))
    assert "window=1" in repr(module) and "backend='auto'" in repr(module)
    assert torch.equal(fastkd.AffinityDistillationLoss(reduction="sum")(s, t),
                       F.affinity_distillation_loss(s, t, reduction="sum"))


# ------------------------------------------------------------------ the cpp backend's node pooling (pool_nodes)

def cpp_pooling():
    """The cpp backend's pooling function (skips where fastkd._C is not built)."""
    helpers.make_backend("cpp", None)
    from fastkd.ops.affinity_full import extension_backend

    return extension_backend


def node_grid_of(x, kernel, pool):
    return _graph.node_grid(x.shape[2], x.shape[3], kernel, pool, None)


# kernel sizes: patches folded by column (narrower than 16 pixels) with a partial last patch, wide patches folded
# as runs, one patch covering the map, and rows of one patch
POOL_KERNELS = [(2, 2), (3, 2), (2, 17), (5, 16), (13, 37), (1, 5)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("kernel", POOL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_pooling_matches_the_torch_pooling(dtype, kernel, pool, layout, gen):
    """Nodes and dL/dx against the torch backend's pooling: bitwise for max pooling, ties (post-ReLU zeros)
    included (both send the gradient to the first maximal pixel of the patch), to float64 rounding for
    averages."""
    extension_backend = cpp_pooling()
    x = as_layout(torch.relu(randn((2, 3, 13, 37), gen, dtype)), layout)
    grid = node_grid_of(x, kernel, pool)
    expected = _graph.pool_nodes(x.requires_grad_(), grid)
    nodes = extension_backend.pool_nodes(x, grid)
    assert nodes.dtype == torch.float64 and nodes.shape == expected.shape
    grad_nodes = torch.randn(nodes.shape, generator=gen, dtype=torch.float64)
    (grad,), (expected_grad,) = (torch.autograd.grad(n, x, grad_nodes) for n in (nodes, expected))
    assert grad.dtype == dtype and grad.stride() == expected_grad.stride()
    if pool == "max":
        assert torch.equal(nodes, expected)
    else:  # float64 sums of n non-negative pixels in another order: within n 2^-53 of each other, relative
        torch.testing.assert_close(nodes, expected, rtol=kernel[0] * kernel[1] * 2.0**-53, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-15 if dtype == torch.float64 else 0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_cpp_pooling_gives_nan_nodes_for_non_finite_patches(bad, pool, gen):
    """A patch holding NaN or +-Inf gives a NaN node (also -Inf under a max, which a max alone would ignore);
    the other nodes are unchanged. A max sends the NaN patch's gradient to its first NaN, and an Inf patch's
    nowhere."""
    extension_backend = cpp_pooling()
    x = randn((1, 2, 6, 8), gen)
    x[0, 1, 4, 5] = x[0, 1, 5, 4] = bad
    grid = node_grid_of(x, (3, 4), pool)
    nodes = extension_backend.pool_nodes(x.requires_grad_(), grid)
    expected = _graph.pool_nodes(torch.nan_to_num(x.detach(), 0.0, 0.0, 0.0), grid)  # that patch's node aside
    (grad,) = torch.autograd.grad(nodes, x, torch.ones_like(nodes))
    nodes = nodes.detach().clone()
    assert torch.isnan(nodes[0, 1, 1, 1])
    nodes[0, 1, 1, 1] = expected[0, 1, 1, 1]
    torch.testing.assert_close(nodes, expected, rtol=1e-15, atol=0)
    patch = grad[0, 1, 3:6, 4:8]
    if pool == "max":
        assert patch.count_nonzero() == (1 if bad != bad else 0)
        assert bad == bad or patch[1, 1] == 1  # the first NaN in row-major order: (4, 5)
    assert torch.isnan(fastkd.PairwiseAffinityLoss(patch=(3, 4), pool=pool, backend="cpp")(x.detach(), x.detach()))


def test_cpp_pooling_is_bitwise_the_same_for_any_number_of_threads(gen):
    extension_backend = cpp_pooling()
    x = randn((2, 8, 64, 96), gen).requires_grad_()
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for pool in ("avg", "max"):
                nodes = extension_backend.pool_nodes(x, node_grid_of(x, (3, 5), pool))
                results.append((nodes, *torch.autograd.grad(nodes, x, torch.ones_like(nodes))))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run, other in zip(results[:2], results[2:]) for a, b in zip(run, other))


def test_cpp_pooled_graph_reads_the_input_without_full_size_temporaries(gen):
    """The authors' setting on the cpp backend: the forward allocates nothing the input's size (the torch
    backend's pooling allocates no full-size tensor either, but reads the input twice); the backward's largest
    tensor is the gradient itself."""
    cpp_pooling()
    s, t = near_converged_pair((2, 16, 64, 64), gen)
    loss = fastkd.PairwiseAffinityLoss(pool_scale=0.5, detach_norm=True, backend="cpp")
    s.requires_grad_()
    with LargestTensor() as recorder:
        value = loss(s, t)
    assert 0 < recorder.largest_bytes <= 2 * 16 * 4 * 8  # the (B, C, 2, 2) float64 nodes
    with LargestTensor() as recorder:
        (grad,) = torch.autograd.grad(value, s)
    assert recorder.largest_bytes == grad.numel() * grad.element_size()


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_cpp_pool_nodes_ops_pass_opcheck(pool, gen):
    cpp_pooling()
    forward_op, backward_op = torch.ops.fastkd.pool_nodes_forward.default, torch.ops.fastkd.pool_nodes_backward.default
    x = randn((2, 3, 7, 5), gen).requires_grad_()
    torch.library.opcheck(forward_op, (x, 3, 2, pool == "max"))
    nodes, winners = forward_op(x.detach(), 3, 2, pool == "max")
    torch.library.opcheck(backward_op, (torch.rand_like(nodes), x.detach(), winners, 3, 2, pool == "max"))


def test_cpp_pool_nodes_ops_refuse_bad_arguments(gen):
    cpp_pooling()
    x = randn((2, 3, 7, 5), gen)
    with pytest.raises(RuntimeError, match="`kernel_h` and `kernel_w` must be >= 1"):
        torch.ops.fastkd.pool_nodes_forward(x, 0, 2, True)
    with pytest.raises(RuntimeError, match=r"`x` must be \(B, C, H, W\)"):
        torch.ops.fastkd.pool_nodes_forward(x[0], 2, 2, True)
    nodes, winners = torch.ops.fastkd.pool_nodes_forward(x, 3, 2, True)
    with pytest.raises(RuntimeError, match="`grad_nodes` must be"):
        torch.ops.fastkd.pool_nodes_backward(nodes[:1], x, winners, 3, 2, True)
    with pytest.raises(RuntimeError, match="`winners` must be int64"):
        torch.ops.fastkd.pool_nodes_backward(nodes, x, winners.int(), 3, 2, True)
