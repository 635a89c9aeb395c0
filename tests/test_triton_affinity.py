"""Triton full-graph affinity kernels (``PairwiseAffinityLoss(window=None)``, ``AffinityDistillationLoss``)
against the literal float64 reference, on both algorithms.

Without a GPU these run under the Triton interpreter on CPU tensors, so the maps are small; node and
channel counts straddle the kernels' block size (32).
"""

import pytest
import torch

import fastkd
from fastkd import reference
from fastkd.ops import pairwise_affinity as pairwise_op
from helpers import DTYPES, TOLERANCES, TRITON_DEVICE, as_layout, compare_with_reference, randn, triton_kernels
from test_pairwise_affinity import LargestTensor, assert_relative_error_below, near_converged_pair, pair

affinity = triton_kernels("affinity")
node_grid = triton_kernels("nodes").node_grid
ALGORITHMS = ["gram", "direct"]


def pairwise(s, t, **config):
    return fastkd.PairwiseAffinityLoss(backend="triton", **config)(s, t)


def distillation(s, t, **config):
    return fastkd.AffinityDistillationLoss(backend="triton", **config)(s, t)


def on_device(tensors):
    return [x.to(TRITON_DEVICE) for x in tensors]


def reference_config(config):
    """The reference takes every argument but ``algorithm`` (both algorithms compute the same loss)."""
    return {key: value for key, value in config.items() if key != "algorithm"}


def check_pairwise(inputs, grad_inputs=(0,), **config):
    compare_with_reference(lambda a, b, **c: pairwise(a, b, **config),
                           lambda a, b, **c: reference.pairwise_affinity_loss(a, b, **reference_config(config)),
                           on_device(inputs), grad_inputs)


def check_distillation(inputs, grad_inputs=(0,), **config):
    compare_with_reference(lambda a, b, **c: distillation(a, b, **config),
                           lambda a, b, **c: reference.affinity_distillation_loss(a, b, **reference_config(config)),
                           on_device(inputs), grad_inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_matches_reference_in_every_dtype(algorithm, dtype, gen):
    check_pairwise(pair((2, 5, 3, 7, 13), gen, dtype), algorithm=algorithm)


PAIRWISE_CONFIGS = [
    dict(patch=2),
    dict(patch=(3, 2), pool="max"),
    dict(pool_scale=0.5),
    dict(detach_norm=True, patch=(2, 3)),
    dict(eps=1e-2, reduction="sum"),
    dict(window=50),  # spans the grid: the full graph
]


@pytest.mark.parametrize("config", PAIRWISE_CONFIGS, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_configurations(config, algorithm, gen):
    check_pairwise(pair((2, 6, 4, 9, 10), gen, torch.float32, config), algorithm=algorithm, **config)


# (B, Cs, Ct, H, W): node counts 31, 32, 33 and channel counts 31, 32, 33 around the block size 32, and
# two nodes. (With one node only a_11 = (|f| / (|f| + eps))^2 ~ 1 - 2 eps / |f| exists, and its ~1e-14
# loss is below the Gram identity's float64 rounding of terms of size 1.)
BLOCK_EDGES = [(1, 31, 33, 1, 31), (2, 32, 3, 4, 8), (1, 33, 32, 3, 11), (2, 2, 1, 1, 2)]


@pytest.mark.parametrize("shape", BLOCK_EDGES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_block_boundaries(shape, algorithm, gen):
    check_pairwise(pair(shape, gen, torch.float32), algorithm=algorithm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distillation_matches_reference_in_every_dtype(algorithm, dtype, gen):
    check_distillation(pair((2, 5, 3, 7, 13), gen, dtype), algorithm=algorithm)


@pytest.mark.parametrize("shape", BLOCK_EDGES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distillation_block_boundaries(shape, algorithm, gen):
    check_distillation(pair(shape, gen, torch.float32), algorithm=algorithm, reduction="sum")


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_memory_layouts(layout, algorithm, gen):
    s, t = pair((2, 6, 5, 11, 7), gen, torch.float32, dict(pool="max"))
    s, t = as_layout(s, layout), as_layout(t, layout)
    check_pairwise([s, t], algorithm=algorithm, patch=2, pool="max")
    check_distillation([s, t], algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_teacher_gradient(algorithm, gen):
    s, t = pair((2, 4, 6, 5, 8), gen, torch.float64)
    check_pairwise([s, t], grad_inputs=(0, 1), algorithm=algorithm, patch=2)
    check_distillation([s, t], grad_inputs=(0, 1), algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradcheck(algorithm, gen):
    """float64 finite differences; fast mode (a random projection of the Jacobian) keeps the interpreter's
    share of the O(numel) forward evaluations small."""
    s, t = on_device(pair((2, 3, 2, 3, 4), gen, torch.float64))
    inputs = (s.requires_grad_(), t.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: pairwise(a, b, algorithm=algorithm, patch=(1, 2)), inputs,
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: distillation(a, b, algorithm=algorithm), inputs, fast_mode=True)


def test_gram_and_direct_agree_and_the_cost_model_picks_like_the_torch_backend(gen):
    s, t = on_device(pair((2, 40, 24, 3, 3), gen, torch.float64))
    gram, direct = (pairwise(s, t, algorithm=a) for a in ALGORITHMS)
    torch.testing.assert_close(gram, direct, rtol=1e-10, atol=0)
    assert not pairwise_op.use_gram(9, 40, 24)  # auto takes the direct path here ...
    assert torch.equal(pairwise(s, t), direct)
    s, t = on_device(pair((1, 3, 2, 6, 7), gen, torch.float64))
    assert pairwise_op.use_gram(42, 3, 2)  # ... and the Gram path here
    assert torch.equal(pairwise(s, t), pairwise(s, t, algorithm="gram"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_identical_rows_give_zero_distillation_loss_and_gradient(algorithm, gen):
    s = randn((2, 3, 5, 4), gen, torch.float64).to(TRITON_DEVICE)
    t = s.clone()
    t[0] += randn((3, 5, 4), gen, torch.float64).to(TRITON_DEVICE)  # image 0 differs, image 1 is identical
    s.requires_grad_()
    (grad,) = torch.autograd.grad(distillation(s, t, algorithm=algorithm), s)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros_like(grad[1]))
    same = s.detach().clone().requires_grad_()
    zero = distillation(same, same.detach(), algorithm=algorithm)
    zero.backward()
    assert zero.item() == 0 and torch.equal(same.grad, torch.zeros_like(same.grad))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_finite_input_gives_nan(bad, algorithm, gen):
    s, t = on_device(pair((2, 3, 4, 5, 6), gen, torch.float32))
    s[1, 2, 3, 4] = bad
    assert torch.isnan(pairwise(s, t, algorithm=algorithm))
    assert torch.isnan(pairwise(s, t, algorithm=algorithm, patch=2, pool="max"))
    assert torch.isnan(distillation(s, t, algorithm=algorithm))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_results_are_bitwise_reproducible(algorithm, gen):
    s, t = on_device(pair((2, 7, 5, 9, 8), gen, torch.float32))
    runs = []
    for _ in range(2):
        x = s.clone().requires_grad_()
        loss = pairwise(x, t, algorithm=algorithm) + distillation(x, t, algorithm=algorithm)
        runs.append((loss, *torch.autograd.grad(loss, x)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("loss_fn,reference_fn", [(pairwise, reference.pairwise_affinity_loss),
                                                  (distillation, reference.affinity_distillation_loss)],
                         ids=["pairwise", "distillation"])
def test_near_convergence_float32(loss_fn, reference_fn, gen):
    """Teacher = student (1 + 1e-3 noise), correlated post-ReLU features: the Gram terms cancel to ~1e-6
    of their size, and the float64 accumulation keeps the loss and gradient to 1e-4 of the reference."""
    s, t = on_device(near_converged_pair((1, 16, 48, 48), gen))
    assert_relative_error_below(loss_fn, reference_fn, s, t, 1e-4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_m_by_m_tensor_in_the_kernels_forward_or_backward(algorithm, gen):
    """Every tensor the custom ops allocate is at most O(B C m): the largest, in bytes, is one float64
    (B, Ct, m) buffer; m x m would be 4.2M elements here. (Bytes, because the Triton interpreter views its
    arguments as uint8 tensors.)"""
    s, t = randn((1, 8, 32, 64), gen).to(TRITON_DEVICE), randn((1, 11, 32, 64), gen).to(TRITON_DEVICE)
    grid = node_grid(32, 64, (1, 1), "avg", None)
    use_gram = algorithm == "gram"
    if not use_gram:  # the direct kernels are O(m^2 C) work: keep the interpreter's share small
        s, t, grid = s[..., :8, :].clone(), t[..., :8, :].clone(), node_grid(8, 64, (1, 1), "avg", None)
    with LargestTensor() as recorder:
        forward = affinity.affinity_forward._init_fn(s, t, *grid, 1e-8, use_gram, True, False)
        affinity.affinity_backward._init_fn(torch.ones_like(forward[0]), s, t, *forward[1:], *grid, 1e-8, use_gram,
                                            False, True, True)
    assert 0 < recorder.largest_bytes <= t.numel() * 8


@pytest.mark.parametrize("use_gram", [True, False])
@pytest.mark.parametrize("per_row", [True, False])
def test_custom_ops_pass_opcheck(use_gram, per_row, gen):
    s, t = on_device(pair((2, 3, 4, 3, 5), gen, torch.float32))
    grid = tuple(node_grid(3, 5, (1, 2), "max", None))
    args = (s.requires_grad_(), t, *grid, 1e-8, use_gram, per_row, False)
    torch.library.opcheck(affinity.affinity_forward, args)
    forward = affinity.affinity_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_terms = torch.rand_like(forward[0])
    torch.library.opcheck(affinity.affinity_backward,
                          (grad_terms, s.detach(), t, *forward[1:], *grid, 1e-8, use_gram, False, True, True))


def test_compiles_without_graph_breaks(gen):
    s, t = on_device(pair((2, 4, 3, 6, 5), gen, torch.float32))

    def losses(a, b):
        return pairwise(a, b, patch=2) + distillation(a, b, algorithm="direct")

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    expected, actual = losses(x, t), compiled(y, t)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(actual, y)[0], torch.autograd.grad(expected, x)[0],
                               rtol=1e-6, atol=1e-9)


def test_the_notes_table_is_current():
    """NOTES.md quotes the FLOP/byte table of fastkd.triton_kernels.costs verbatim."""
    import pathlib

    costs = triton_kernels("costs")
    notes = pathlib.Path(costs.__file__).with_name("NOTES.md")
    assert notes.exists(), "NOTES.md must be installed with the package"
    assert costs.table() in notes.read_text()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_dtype_pairs_match_the_torch_backend(dtypes, gen):
    """Student and teacher in different dtypes: each pointer is read in its own dtype, gradients come back in
    the student's."""
    s = randn((2, 5, 7, 9), gen, dtypes[0]).to(TRITON_DEVICE)
    t = randn((2, 3, 7, 9), gen, dtypes[1]).to(TRITON_DEVICE)
    for loss in (fastkd.PairwiseAffinityLoss, fastkd.AffinityDistillationLoss, fastkd.ConsistencyLoss):
        results = []
        for backend in ("triton", "torch"):
            x = s.clone().requires_grad_()
            value = loss(backend=backend)(x, t)
            results.append((value, *torch.autograd.grad(value, x)))
        (kernel, kernel_grad), (expected, expected_grad) = results
        assert kernel.dtype == expected.dtype and kernel_grad.dtype == dtypes[0]
        torch.testing.assert_close(kernel, expected, rtol=1e-6, atol=0)
        # both round the same float64 gradient to the student dtype (the interpreter truncates to bfloat16)
        torch.testing.assert_close(kernel_grad.double(), expected_grad.double(), rtol=0,
                                   atol=2 * TOLERANCES[dtypes[0]][1] * expected_grad.abs().max().item())
