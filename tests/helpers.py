"""Shared test helpers: inputs, layouts and the dtype tolerance table."""

import importlib
import os
from typing import Sequence

import pytest
import torch

from fastkd.triton_kernels import TRITON_ERROR

# The Triton kernels run on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (set in
# conftest.py). Without triton their tests are skipped, except where FASTKD_REQUIRE_TRITON=1 (.ci/run sets
# it): there a missing triton fails them instead of hiding them.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The CUDA kernels run on the GPU when there is one, else on CPU tensors through fastkd's CUDA emulator
# (tests set FASTKD_EMULATE_CUDA=1 for them).
CUDA_DEVICE = TRITON_DEVICE


def triton_kernels(name: str, skip_module: bool = True):
    """``fastkd.triton_kernels.<name>`` for a Triton test. Where triton cannot be imported the module (or, with
    ``skip_module=False``, the calling test) is skipped, or, with FASTKD_REQUIRE_TRITON=1, fails with the
    import error."""
    if TRITON_ERROR is not None and os.environ.get("FASTKD_REQUIRE_TRITON") != "1":
        pytest.skip(f"the triton backend is unavailable: {TRITON_ERROR}", allow_module_level=skip_module)
    return importlib.import_module(f"fastkd.triton_kernels.{name}")

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

    ``scale`` widens the tolerance for results that went through more roundings (e.g. gradients).
    """
    rtol, atol = TOLERANCES[dtype]
    expected = expected.detach().to(torch.float64)
    peak = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.detach().to(torch.float64), expected, rtol=rtol * scale, atol=atol * scale * peak + 1e-300
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
