"""The kernel backends (triton, cuda) of the full-graph affinity losses (``PairwiseAffinityLoss(window=None)``,
``AffinityDistillationLoss``) against the literal float64 reference, on both algorithms.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors and the CUDA kernels under
fastkd's CUDA emulator (FASTKD_EMULATE_CUDA=1), so the maps are small; node and channel counts straddle
each backend's block size (Triton programs: 32 nodes x 32 channels; CUDA tiles: 16 x 16).
"""

from dataclasses import dataclass

import pytest
import torch

import fastkd
import helpers
from fastkd import _extension, reference
from fastkd.ops import pairwise_affinity as pairwise_op
from fastkd.ops.nodes import node_grid
from helpers import DTYPES, TOLERANCES, as_layout, compare_with_reference, randn
from test_pairwise_affinity import LargestTensor, assert_relative_error_below, near_converged_pair, pair

ALGORITHMS = ["gram", "direct"]


@dataclass
class KernelBackend:
    name: str
    device: torch.device
    block: int  # nodes and channels per program (triton) or tile (cuda)
    forward: object  # the full-graph forward op (fastkd.ops.affinity_kernels)
    backward: object

    def pairwise(self, s, t, **config):
        return fastkd.PairwiseAffinityLoss(backend=self.name, **config)(s, t)

    def distillation(self, s, t, **config):
        return fastkd.AffinityDistillationLoss(backend=self.name, **config)(s, t)

    def on_device(self, tensors):
        return [x.to(self.device) for x in tensors]

    def block_edges(self):
        """(B, Cs, Ct, H, W): node counts and channel counts block - 1, block, block + 1, and two nodes.
        (With one node only a_11 = (|f| / (|f| + eps))^2 ~ 1 - 2 eps / |f| exists, and its ~1e-14 loss is
        below the Gram identity's float64 rounding of terms of size 1.)"""
        n = self.block
        return [(1, n - 1, n + 1, 1, n - 1), (2, n, 3, 4, n // 4), (1, n + 1, n, 1, n + 1), (2, 2, 1, 1, 2)]


def triton_backend():
    affinity = helpers.triton_kernels("affinity", skip_module=False)
    return KernelBackend("triton", helpers.TRITON_DEVICE, affinity.BLOCK_NODES, affinity.affinity_forward,
                         affinity.affinity_backward)


def cuda_backend():
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"the cuda backend is unavailable: {_extension.LOAD_ERROR}")
    # kAffinityFullTile = 16 in csrc/kernels/affinity_full.h
    return KernelBackend("cuda", helpers.CUDA_DEVICE, 16, torch.ops.fastkd.cuda_affinity_forward.default,
                         torch.ops.fastkd.cuda_affinity_backward.default)


@pytest.fixture(params=["triton", "cuda"])
def kernel(request, monkeypatch):
    if request.param == "cuda" and helpers.CUDA_DEVICE.type == "cpu":
        monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
    return triton_backend() if request.param == "triton" else cuda_backend()


def reference_config(config):
    """The reference takes every argument but ``algorithm`` (both algorithms compute the same loss)."""
    return {key: value for key, value in config.items() if key != "algorithm"}


def check_pairwise(kernel, inputs, grad_inputs=(0,), **config):
    compare_with_reference(lambda a, b, **c: kernel.pairwise(a, b, **config),
                           lambda a, b, **c: reference.pairwise_affinity_loss(a, b, **reference_config(config)),
                           kernel.on_device(inputs), grad_inputs)


def check_distillation(kernel, inputs, grad_inputs=(0,), **config):
    compare_with_reference(lambda a, b, **c: kernel.distillation(a, b, **config),
                           lambda a, b, **c: reference.affinity_distillation_loss(a, b, **reference_config(config)),
                           kernel.on_device(inputs), grad_inputs)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_matches_reference_in_every_dtype(kernel, algorithm, dtype, gen):
    check_pairwise(kernel, pair((2, 5, 3, 7, 13), gen, dtype), algorithm=algorithm)


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
def test_pairwise_configurations(kernel, config, algorithm, gen):
    check_pairwise(kernel, pair((2, 6, 4, 9, 10), gen, torch.float32, config), algorithm=algorithm, **config)


@pytest.mark.parametrize("edge", range(4))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pairwise_block_boundaries(kernel, edge, algorithm, gen):
    check_pairwise(kernel, pair(kernel.block_edges()[edge], gen, torch.float32), algorithm=algorithm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distillation_matches_reference_in_every_dtype(kernel, algorithm, dtype, gen):
    check_distillation(kernel, pair((2, 5, 3, 7, 13), gen, dtype), algorithm=algorithm)


@pytest.mark.parametrize("edge", range(4))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_distillation_block_boundaries(kernel, edge, algorithm, gen):
    check_distillation(kernel, pair(kernel.block_edges()[edge], gen, torch.float32), algorithm=algorithm,
                       reduction="sum")


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_memory_layouts(kernel, layout, algorithm, gen):
    s, t = pair((2, 6, 5, 11, 7), gen, torch.float32, dict(pool="max"))
    s, t = as_layout(s, layout), as_layout(t, layout)
    check_pairwise(kernel, [s, t], algorithm=algorithm, patch=2, pool="max")
    check_distillation(kernel, [s, t], algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_teacher_gradient(kernel, algorithm, gen):
    s, t = pair((2, 4, 6, 5, 8), gen, torch.float64)
    check_pairwise(kernel, [s, t], grad_inputs=(0, 1), algorithm=algorithm, patch=2)
    check_distillation(kernel, [s, t], grad_inputs=(0, 1), algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradcheck(kernel, algorithm, gen):
    """float64 finite differences; fast mode (a random projection of the Jacobian) keeps the interpreter's
    share of the O(numel) forward evaluations small."""
    s, t = kernel.on_device(pair((2, 3, 2, 3, 4), gen, torch.float64))
    inputs = (s.requires_grad_(), t.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: kernel.pairwise(a, b, algorithm=algorithm, patch=(1, 2)), inputs,
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: kernel.distillation(a, b, algorithm=algorithm), inputs, fast_mode=True)


def test_gram_and_direct_agree_and_the_cost_model_picks_like_the_torch_backend(kernel, gen):
    s, t = kernel.on_device(pair((2, 40, 24, 3, 3), gen, torch.float64))
    gram, direct = (kernel.pairwise(s, t, algorithm=a) for a in ALGORITHMS)
    torch.testing.assert_close(gram, direct, rtol=1e-10, atol=0)
    assert not pairwise_op.use_gram(9, 40, 24)  # auto takes the direct path here ...
    assert torch.equal(kernel.pairwise(s, t), direct)
    s, t = kernel.on_device(pair((1, 3, 2, 6, 7), gen, torch.float64))
    assert pairwise_op.use_gram(42, 3, 2)  # ... and the Gram path here
    assert torch.equal(kernel.pairwise(s, t), kernel.pairwise(s, t, algorithm="gram"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_identical_rows_give_zero_distillation_loss_and_gradient(kernel, algorithm, gen):
    s = randn((2, 3, 5, 4), gen, torch.float64).to(kernel.device)
    t = s.clone()
    t[0] += randn((3, 5, 4), gen, torch.float64).to(kernel.device)  # image 0 differs, image 1 is identical
    s.requires_grad_()
    (grad,) = torch.autograd.grad(kernel.distillation(s, t, algorithm=algorithm), s)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros_like(grad[1]))
    same = s.detach().clone().requires_grad_()
    zero = kernel.distillation(same, same.detach(), algorithm=algorithm)
    zero.backward()
    assert zero.item() == 0 and torch.equal(same.grad, torch.zeros_like(same.grad))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_finite_input_gives_nan(kernel, bad, algorithm, gen):
    s, t = kernel.on_device(pair((2, 3, 4, 5, 6), gen, torch.float32))
    s[1, 2, 3, 4] = bad
    assert torch.isnan(kernel.pairwise(s, t, algorithm=algorithm))
    assert torch.isnan(kernel.pairwise(s, t, algorithm=algorithm, patch=2, pool="max"))
    assert torch.isnan(kernel.distillation(s, t, algorithm=algorithm))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_results_are_bitwise_reproducible(kernel, algorithm, gen):
    s, t = kernel.on_device(pair((2, 7, 5, 9, 8), gen, torch.float32))
    runs = []
    for _ in range(2):
        x = s.clone().requires_grad_()
        loss = kernel.pairwise(x, t, algorithm=algorithm) + kernel.distillation(x, t, algorithm=algorithm)
        runs.append((loss, *torch.autograd.grad(loss, x)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("loss,reference_fn", [("pairwise", reference.pairwise_affinity_loss),
                                               ("distillation", reference.affinity_distillation_loss)],
                         ids=["pairwise", "distillation"])
def test_near_convergence_float32(kernel, loss, reference_fn, gen):
    """Teacher = student (1 + 1e-3 noise), correlated post-ReLU features: the Gram terms cancel to ~1e-6
    of their size, and the float64 accumulation keeps the loss and gradient to 1e-4 of the reference."""
    s, t = kernel.on_device(near_converged_pair((1, 16, 48, 48), gen))
    assert_relative_error_below(getattr(kernel, loss), reference_fn, s, t, 1e-4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_m_by_m_tensor_in_the_triton_kernels_forward_or_backward(algorithm, gen):
    """Every tensor the Triton custom ops allocate is at most O(B C m): the largest, in bytes, is one float64
    (B, Ct, m) buffer; m x m would be 4.2M elements here. (Bytes, because the Triton interpreter views its
    arguments as uint8 tensors. The CUDA ops allocate inside C++, out of a dispatch mode's sight.)"""
    kernel, affinity = triton_backend(), helpers.triton_kernels("affinity", skip_module=False)
    s, t = randn((1, 8, 32, 64), gen).to(kernel.device), randn((1, 11, 32, 64), gen).to(kernel.device)
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
def test_custom_ops_pass_opcheck(kernel, use_gram, per_row, gen):
    s, t = kernel.on_device(pair((2, 3, 4, 3, 5), gen, torch.float32))
    grid = tuple(node_grid(3, 5, (1, 2), "max", None))
    args = (s.requires_grad_(), t, *grid, 1e-8, use_gram, per_row, False)
    torch.library.opcheck(kernel.forward, args)
    forward = kernel.forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_terms = torch.rand_like(forward[0])
    torch.library.opcheck(kernel.backward,
                          (grad_terms, s.detach(), t, *forward[1:], *grid, 1e-8, use_gram, False, True, True))


def test_compiles_without_graph_breaks(kernel, gen):
    s, t = kernel.on_device(pair((2, 4, 3, 6, 5), gen, torch.float32))

    def losses(a, b):
        return kernel.pairwise(a, b, patch=2) + kernel.distillation(a, b, algorithm="direct")

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()
    expected, actual = losses(x, t), compiled(y, t)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(actual, y)[0], torch.autograd.grad(expected, x)[0],
                               rtol=1e-6, atol=1e-9)


def test_the_notes_table_is_current():
    """NOTES.md quotes the FLOP/byte table of fastkd.triton_kernels.costs verbatim."""
    import pathlib

    costs = helpers.triton_kernels("costs", skip_module=False)
    notes = pathlib.Path(costs.__file__).with_name("NOTES.md")
    assert notes.exists(), "NOTES.md must be installed with the package"
    assert costs.table() in notes.read_text()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.bfloat16, torch.float64)], ids=str)
def test_mixed_dtype_pairs_match_the_torch_backend(kernel, dtypes, gen):
    """Student and teacher in different dtypes: each pointer is read in its own dtype, gradients come back in
    the student's."""
    s = randn((2, 5, 7, 9), gen, dtypes[0]).to(kernel.device)
    t = randn((2, 3, 7, 9), gen, dtypes[1]).to(kernel.device)
    for loss in (fastkd.PairwiseAffinityLoss, fastkd.AffinityDistillationLoss, fastkd.ConsistencyLoss):
        results = []
        for backend in (kernel.name, "torch"):
            x = s.clone().requires_grad_()
            value = loss(backend=backend)(x, t)
            results.append((value, *torch.autograd.grad(value, x)))
        (value, value_grad), (expected, expected_grad) = results
        assert value.dtype == expected.dtype and value_grad.dtype == dtypes[0]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
        # both round the same float64 gradient to the student dtype (the interpreter truncates to bfloat16)
        torch.testing.assert_close(value_grad.double(), expected_grad.double(), rtol=0,
                                   atol=2 * TOLERANCES[dtypes[0]][1] * expected_grad.abs().max().item())
