"""Shared test helpers: the backend fixture, inputs, layouts and the dtype tolerance table."""

import importlib
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import _extension
from fastkd._triton import TRITON_ERROR
from fastkd.ops._graph import pool_kernel

# The Triton kernels run on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (set in
# conftest.py). Without triton their tests are skipped, except where FASTKD_REQUIRE_TRITON=1 (.ci/run sets
# it): there a missing triton fails them instead of hiding them.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The CUDA kernels run on the GPU when there is one, else on CPU tensors through fastkd's CUDA emulator
# (tests set FASTKD_EMULATE_CUDA=1 for them).
CUDA_DEVICE = TRITON_DEVICE
# benchmarks/, whose modules (providers, the emulator's profile cases) some tests import.
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")



# Block sizes the boundary tests straddle, per (op, backend), as the kernels define them.
BLOCKS: Dict[Tuple[str, str], Dict[str, int]] = {
    # fastkd/ops/_triton_nodes.py BLOCK_NODES, BLOCK_CHANNELS (and the Triton Gram kernel's GRAM_CHANNELS, its
    # apply kernel's APPLY_ROWS, in affinity_full/triton_backend.py); csrc/affinity_full/affinity_full.h
    # kAffinityDirectSide (the direct kernels' tiles of D, and the channels their backward computes at a
    # time; kAffinityChannelChunk = 16 are staged at a time), and for the Gram algorithm's kernels 64 nodes
    # (affinity_full.cu's kApplyNodes, two of the Gram kernel's kAffinityGramChunk) and 64 channels
    # (kAffinityGramSide, and kApplyRows). Few nodes: up to few_nodes nodes an image the direct forward forms D
    # whole, its channels split over blocks (kAffinityFewNodes in affinity_full.h, FEW_NODES in
    # affinity_full/triton_backend.py), and below split_nodes nodes in all the node reductions split each node's
    # channels (32 warps share a block's 32 nodes: kFewNodes in csrc/common/nodes.cu; a program per
    # BLOCK_CHANNELS: FEW_NODES in fastkd/ops/_triton_nodes.py).
    # direct_side: kAffinityDirectSide, the CUDA direct row kernel's tiles of D (Triton's: its DIRECT_ROWS rows
    # of D a program, in affinity_full/triton_backend.py); wide_patch: kWidePatch in
    # csrc/common/nodes.cu, the patch width from which a warp pools a channel of a node (lanes along its rows)
    ("affinity_full", "triton"): dict(nodes=32, channels=32, gram_nodes=32, gram_channels=64, few_nodes=64,
                                      split_nodes=8192, direct_side=64),
    ("affinity_full", "cuda"): dict(nodes=64, channels=64, gram_nodes=64, gram_channels=64, few_nodes=64,
                                    split_nodes=8192, direct_side=64, wide_patch=16),
    # triton: affinity_window/triton_backend.py BLOCK_N (256 under the interpreter, 32 compiled) and
    # BLOCK_CHANNELS; cuda: kThreads in csrc/affinity_window/affinity_window.cu (nodes per block of the per-node
    # kernels), and its tiled kernels' kTileRows x kTileCols nodes, kChunk channels staged at a time and
    # kGradientChannels channels a gradient block;
    # cpp: csrc/affinity_window/affinity_window_cpu.cpp's kTileNodes (a tile: a run of nodes of one node row)
    # and kChannelBlock (channels a pass of the forward's dot products)
    ("affinity_window", "triton"): dict(nodes=256 if TRITON_DEVICE.type == "cpu" else 32, channels=32),
    ("affinity_window", "cuda"): dict(nodes=256, channels=1, tile_rows=8, tile_cols=32, chunk=8,
                                      gradient_channels=64),
    ("affinity_window", "cpp"): dict(nodes=256, channels=4),
    # consistency/triton_backend.py BLOCK_P, BLOCK_C; kThreads in csrc/consistency/consistency.cu (one
    # thread per pixel, channels one at a time)
    ("consistency", "triton"): dict(pixels=128, channels=8),
    ("consistency", "cuda"): dict(pixels=256, channels=1),
    # csrc/consistency/consistency_cpu.cpp's kTilePixels x kTileRows (a forward tile; backward: one row of it)
    ("consistency", "cpp"): dict(pixels=128, rows=8),
    # kMaxLanes pixels per block in csrc/common/softmax_block_cpu.h, fewer above kBufferDoubles / kMaxLanes = 32
    # channels
    ("pixelwise_kd", "cpp"): dict(pixels=256, channels=32),
    ("probability", "cpp"): dict(pixels=256, channels=32),
    # fastkd/ops/_triton_per_pixel.py BLOCK_P, BLOCK_C (both per-pixel ops)
    ("pixelwise_kd", "triton"): dict(pixels=128, channels=4),
    ("probability", "triton"): dict(pixels=128, channels=4),
    # kThreads in csrc/common/softmax_math.cuh (both per-pixel ops: one thread per pixel); its channel loops start
    # the softmax at channel 0 and take the others one at a time, loading one ahead: channels 1 (no step), 2, 3
    ("pixelwise_kd", "cuda"): dict(pixels=256, channels=2),
    ("probability", "cuda"): dict(pixels=256, channels=2),
}


@dataclass(frozen=True)
class Backend:
    """One backend as the tests run it: its ``backend=`` name, the device its inputs go to, whether its CUDA
    kernels run on the emulator, the ``torch.ops`` namespace of its custom ops (None for torch) and the
    tolerance table its results are held to."""

    name: str
    device: torch.device
    emulated: bool = False
    namespace: Optional[str] = None
    tolerances: Dict[torch.dtype, Tuple[float, float]] = field(default_factory=lambda: TOLERANCES)

    def ops(self, op: str):
        """The forward and backward custom ops of ``op`` (registering their autograd and fakes first)."""
        module = {"triton": "triton_backend", "cuda": "extension_backend", "cpp": "extension_backend"}[self.name]
        importlib.import_module(f"fastkd.ops.{op}.{module}")
        namespace = getattr(torch.ops, self.namespace)
        return getattr(namespace, f"{op}_forward").default, getattr(namespace, f"{op}_backward").default

    def blocks(self, op: str) -> Dict[str, int]:
        return BLOCKS[(op, self.name)]

    def to(self, *tensors):
        return [x.to(self.device) for x in tensors]


def make_backend(name: str, monkeypatch) -> Backend:
    """The :class:`Backend` ``name``. Where it cannot run here the test is skipped (triton not importable, the
    extension not built), except that with FASTKD_REQUIRE_TRITON=1 (.ci/run) a missing triton fails it."""
    if name == "torch":
        return Backend("torch", torch.device("cpu"))
    if name == "triton":
        if TRITON_ERROR is not None and os.environ.get("FASTKD_REQUIRE_TRITON") != "1":
            pytest.skip(f"the triton backend is unavailable: {TRITON_ERROR}")
        return Backend("triton", TRITON_DEVICE, namespace="fastkd_triton")
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"the {name} backend is unavailable: {_extension.LOAD_ERROR}")
    if name == "cpp":
        return Backend("cpp", torch.device("cpu"), namespace="fastkd")
    emulated = CUDA_DEVICE.type == "cpu"
    if emulated:
        monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
    return Backend("cuda", CUDA_DEVICE, emulated, "fastkd_emulated" if emulated else "fastkd")


def backend_fixture(*names: str):
    """A ``backend`` fixture over ``names`` for a test module (``backend = helpers.backend_fixture(...)``); one
    test narrows it with ``@pytest.mark.parametrize("backend", [...], indirect=True)``."""

    @pytest.fixture(params=names)
    def backend(request, monkeypatch) -> Backend:
        return make_backend(request.param, monkeypatch)

    return backend


DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# (rtol, atol relative to the largest |expected|) for a result against the float64 reference evaluated on
# the same (rounded) inputs. The backends accumulate in float32 or better, so the error is dominated by
# rounding the result to the input dtype: 2**-24 for float32, 2**-11 for float16 and 2**-8 for bfloat16,
# a few times over for results that pass through several roundings.
TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def randn(shape: Sequence[int], generator: torch.Generator, dtype=torch.float32, scale: float = 1.0):
    """Standard normal values drawn in float64 and rounded to ``dtype``."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last, or a strided view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a twice-as-wide buffer: a non-contiguous view
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """``actual`` (any dtype) equals the float64 ``expected`` within the tolerance of ``dtype``.

    ``scale`` widens the tolerance for results that went through more roundings (e.g. gradients). No value
    stored in ``actual``'s dtype is nearer than half its spacing at zero (a subnormal's), so that spacing is
    the least absolute tolerance: a half-precision gradient far below the peak of all gradients is subnormal.
    """
    rtol, atol = TOLERANCES[dtype]
    expected = expected.detach().to(torch.float64)
    peak = expected.abs().max().item() if expected.numel() else 0.0
    finfo = torch.finfo(actual.dtype)
    subnormal_spacing = finfo.smallest_normal * finfo.eps
    torch.testing.assert_close(
        actual.detach().to(torch.float64), expected, rtol=rtol * scale,
        atol=(atol * peak + subnormal_spacing) * scale,
    )


def compare_with_reference(loss_fn, reference_fn, inputs, grad_inputs=(0,), dtype=None, **kwargs):
    """Checks ``loss_fn(*inputs, **kwargs)`` and its gradients against ``reference_fn`` on float64 copies.

    ``grad_inputs``: indices of the inputs to differentiate. Half-precision gradients are taken with a
    loss-scale seed (as mixed-precision training does) so that they are not subnormal.
    """
    dtype = dtype or inputs[0].dtype
    inputs = [x.detach().requires_grad_(i in grad_inputs) for i, x in enumerate(inputs)]
    exact = [x.detach().to(torch.float64).requires_grad_(i in grad_inputs) for i, x in enumerate(inputs)]
    expected = reference_fn(*exact, **kwargs)
    expected_grads = torch.autograd.grad(expected, [exact[i] for i in grad_inputs])
    seed = 1.0
    if dtype in (torch.float16, torch.bfloat16):
        peak = max(g.abs().max().item() for g in expected_grads)
        seed = float(min(max(2.0 ** round(-torch.log2(torch.tensor(peak)).item()), 1.0), 2.0**14)) if peak else 1.0
    loss = loss_fn(*inputs, **kwargs)
    assert loss.dim() == 0 and loss.dtype == torch.promote_types(dtype, torch.float32), (loss.shape, loss.dtype)
    assert_close(loss, expected, dtype)
    grads = torch.autograd.grad(loss, [inputs[i] for i in grad_inputs], torch.tensor(seed, dtype=dtype))
    for i, grad, expected_grad in zip(grad_inputs, grads, expected_grads):
        assert grad.dtype == inputs[i].dtype and grad.shape == inputs[i].shape
        assert_close(grad, expected_grad * seed, dtype, scale=2)
    return loss, grads


# ------------------------------------------------------------------------------- affinity inputs and checks

def unique_patch_maxima(x, gen, config):
    """Adds 16 (far above any N(0, 1) sample) to one random pixel of every patch so that max pooling has
    no ties, even in bfloat16 (tied maxima have many valid subgradients: torch picks one element, the
    reference's amax splits evenly)."""
    if config.get("pool") != "max" and config.get("pool_scale") is None:
        return x
    patch = config.get("patch", 1)
    patch = (patch, patch) if isinstance(patch, int) else patch
    kernel = pool_kernel(x.shape[2], x.shape[3], patch, config.get("pool_scale"))
    ranks = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    _, winners = torch.nn.functional.max_pool2d(ranks, kernel, kernel, ceil_mode=True, return_indices=True)
    bump = torch.zeros(x.shape, dtype=torch.float64).flatten(2).scatter_(2, winners.flatten(2), 16.0)
    return (x.double() + bump.view(x.shape)).to(x.dtype)


def pair(shape, gen, dtype=torch.float64, config=None):
    """Student (B, Cs, H, W) and teacher (B, Ct, H, W) features, tie-free for max pooling (on CPU)."""
    batch, cs, ct, height, width = shape
    s, t = randn((batch, cs, height, width), gen, dtype), randn((batch, ct, height, width), gen, dtype)
    return unique_patch_maxima(s, gen, config or {}), unique_patch_maxima(t, gen, config or {})


def correlated_relu_features(shape, gen):
    """Spatially smooth, channel-correlated, post-ReLU features, like a backbone's."""
    batch, channels, height, width = shape
    z = torch.nn.functional.avg_pool2d(randn(shape, gen, torch.float64), 5, 1, 2, count_include_pad=False)
    mix = randn((channels, channels), gen, torch.float64) / channels**0.5
    return torch.relu(torch.einsum("dc,bchw->bdhw", mix, z) + 0.3)


def near_converged_pair(shape, gen):
    """Teacher = student + 1e-3 relative noise, both float32."""
    s = correlated_relu_features(shape, gen)
    t = s * (1 + 1e-3 * randn(shape, gen, torch.float64))
    return s.float(), t.float()


def assert_relative_error_below(loss_fn, reference_fn, s, t, bound, **config):
    """Loss and gradient (norm-wise) within ``bound`` relative of the float64 reference."""
    s = s.requires_grad_()
    loss = loss_fn(s, t, **config)
    (grad,) = torch.autograd.grad(loss, s)
    exact_s = s.detach().cpu().double().requires_grad_()
    expected = reference_fn(exact_s, t.detach().cpu().double(), **config)
    (expected_grad,) = torch.autograd.grad(expected, exact_s)
    assert expected > 0
    assert abs(loss.item() - expected.item()) <= bound * expected.item()
    assert (grad.cpu().double() - expected_grad).norm() <= bound * expected_grad.norm()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements, and of bytes, of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
                self.largest_bytes = max(self.largest_bytes, x.numel() * x.element_size())
        return out
