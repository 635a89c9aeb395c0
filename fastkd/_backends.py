"""The backend registry: ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"``, for every op, in one table.

An *op* is a memory-heavy computation with interchangeable implementations, named the same in Python,
``csrc/``, tests and benchmarks: ``affinity_full``, ``affinity_window``, ``consistency``, ``pixelwise_kd``,
``probability``. Each lives in one package, ``fastkd/ops/<op>/``, one module per backend:

* ``torch``: ``torch_backend.py``, plain torch; every op has it and it runs on any device;
* ``triton``: ``triton_backend.py``, Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``cuda`` and ``cpp``: ``extension_backend.py``, the compiled ops ``torch.ops.fastkd.<op>_forward`` and
  ``_backward`` of ``fastkd._C``, whose CUDA kernels sit on the CUDA dispatch key and C++ CPU implementation
  (if any) on the CPU key; ``cuda`` on CPU tensors runs the same CUDA kernel sources through fastkd's emulator
  (``torch.ops.fastkd_emulated.<op>_*``) when ``FASTKD_EMULATE_CUDA=1``.

:data:`IMPLEMENTATIONS` says which backends implement which op and which of them ``auto`` may take; the
modules are imported by :func:`load_available` when fastkd is imported (those that can run here), never to
fill the table. A *loss* runs one or more
ops (:data:`LOSS_OPS`); it accepts a backend that implements at least one of them, and runs its other ops
with the torch implementation.

An unknown name is a ``ValueError`` when the loss is built; a backend that cannot run is a
:class:`BackendUnavailableError` (a ``ValueError``) that says why: at construction when the reason does not
depend on the input (not installed, not built, no kernel for this loss), at call time when it does (device).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from fastkd import _extension, _triton

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")

# The order ``auto`` tries, per device type and op. The fused kernels are faster than the torch path wherever
# they can run (on a 2-core CPU, benchmarks/run.py: the cpp windowed graph took 0.06-0.22x the torch backend's
# time from 8x16 to 128x256, the cpp consistency loss 0.06-0.30x from 8x16 to 512x1024, both a quarter of its
# memory or less); ``torch`` is always last and always available. On CUDA tensors, cuda or triton first by the
# kernels' estimated fractions of the H100 floor (benchmarks/results/kernel-evidence/evidence.md, sm_90, no GPU
# run yet): full graph, cuda (Gram 100% against 93%, its backward 73% against 70%, the direct path 96% and 100%
# against 78% and 89%; for few nodes, 100% against 89%); per-pixel losses, cuda (50-100% against
# 28-30%); windowed graph, cuda (its tiles, for reach 1-2: 48% and 53% against 49% and 50%, moving 564 and
# 1,101 MB a pass against 1,087 and 2,161 MB at the example shape); consistency, triton (95% against 88-90%).
_CUDA_FIRST, _TRITON_FIRST = ("cuda", "triton", "torch"), ("triton", "cuda", "torch")
AUTO_PREFERENCE: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "cuda": {"affinity_full": _CUDA_FIRST, "affinity_window": _CUDA_FIRST, "consistency": _TRITON_FIRST,
             "pixelwise_kd": _CUDA_FIRST, "probability": _CUDA_FIRST},
    "cpu": {op: ("cpp", "torch") for op in ("affinity_full", "affinity_window", "consistency", "pixelwise_kd",
                                            "probability")},
}
DEFAULT_PREFERENCE = ("torch",)


class BackendUnavailableError(ValueError):
    """The requested backend exists but cannot run this loss here; the message says why."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op: ``function`` of ``fastkd.ops.<op>.<module>``, imported when
    first run. ``emulated``: for ``cuda``, the function that runs the same kernels on CPU tensors through the
    emulator."""

    op: str
    module: str
    function: str
    emulated: Optional[str] = None

    def load(self, device: torch.device) -> Callable:
        name = self.emulated if self.emulated is not None and device.type != "cuda" else self.function
        module = _LOADED.get(self.module_name)
        if module is None:
            module = _LOADED[self.module_name] = importlib.import_module(self.module_name)
        return getattr(module, name)

    @property
    def module_name(self) -> str:
        return f"fastkd.ops.{self.op}.{self.module}"


# The implementation modules imported so far. ``load_available`` fills it when fastkd is imported:
# torch.compile cannot trace an import, so a loss compiled before its first eager call finds its module here.
_LOADED: Dict[str, object] = {}


def _kernels(op: str, function: str, *, cpp: Optional[str] = None) -> Dict[str, Implementation]:
    """The torch, triton and cuda implementations of an op, each module exposing ``function`` (cuda's emulated
    one: ``emulated_<function>``), and cpp where the op has C++ CPU code: ``cpp``, the extension module's
    function that runs it (``function`` itself where the compiled op has a CPU implementation)."""
    table = {
        "torch": Implementation(op, "torch_backend", function),
        "triton": Implementation(op, "triton_backend", function),
        "cuda": Implementation(op, "extension_backend", function, emulated=f"emulated_{function}"),
    }
    if cpp is not None:
        table["cpp"] = Implementation(op, "extension_backend", cpp)
    return table


IMPLEMENTATIONS: Dict[str, Dict[str, Implementation]] = {
    # cpp: the torch backend's sums on nodes pooled by compiled C++ (fastkd::pool_nodes_*)
    "affinity_full": _kernels("affinity_full", "full_graph_terms", cpp="cpp_full_graph_terms"),
    "affinity_window": _kernels("affinity_window", "window_graph_sum", cpp="window_graph_sum"),
    "consistency": _kernels("consistency", "consistency_sum", cpp="consistency_sum"),
    "pixelwise_kd": _kernels("pixelwise_kd", "pixelwise_kd_terms", cpp="pixelwise_kd_terms"),
    "probability": _kernels("probability", "probability_terms", cpp="probability_terms"),
}

# The ops each loss runs.
LOSS_OPS: Dict[str, Tuple[str, ...]] = {
    "PairwiseAffinityLoss": ("affinity_full", "affinity_window"),
    "AffinityDistillationLoss": ("affinity_full",),
    "ConsistencyLoss": ("consistency",),
    "ProbabilityLoss": ("probability",),
    "PixelwiseKDLoss": ("pixelwise_kd",),
}


def load_available() -> None:
    """Imports every implementation that can run on this machine (triton importable, ``fastkd._C`` loaded)."""
    for implementations in IMPLEMENTATIONS.values():
        for backend, implementation in implementations.items():
            if backend == "triton" and _triton.TRITON_ERROR is not None:
                continue
            if backend in ("cuda", "cpp") and _extension.LOAD_ERROR is not None:
                continue
            implementation.load(torch.device("cpu"))


def _machine_reason(backend: str, loss: str) -> Optional[str]:
    """Why ``backend`` cannot run ``loss`` on this machine at all, or None if it might."""
    if backend == "triton" and _triton.TRITON_ERROR is not None:
        return _triton.TRITON_ERROR
    if not any(backend in IMPLEMENTATIONS[op] for op in LOSS_OPS[loss]):
        return f"fastkd has no {backend} implementation of {loss} yet"
    if backend in ("cuda", "cpp") and _extension.LOAD_ERROR is not None:
        return _extension.LOAD_ERROR
    return None


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on tensors of ``device``, or None if it can."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"Triton kernels run on CUDA tensors and the input is on {device.type} "
            f"(set TRITON_INTERPRET=1 to run them on CPU tensors through the Triton interpreter)"
        )
    if backend == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors and the input is on {device.type}"
    if backend == "cuda":
        if device.type == "cuda" and not _extension.build_info()["cuda"]:
            return "fastkd._C was built without CUDA (reinstall with nvcc present, or FASTKD_FORCE_CUDA=1)"
        if device.type != "cuda" and os.environ.get("FASTKD_EMULATE_CUDA") != "1":
            return (
                f"CUDA kernels run on CUDA tensors and the input is on {device.type} "
                f"(set FASTKD_EMULATE_CUDA=1 to run them on CPU tensors through fastkd's CUDA emulator)"
            )
    return None


def availability(loss: str, device: torch.device) -> Dict[str, Optional[str]]:
    """``{backend: None if it can run loss on tensors of device, else the reason}`` for every backend but auto."""
    return {name: _machine_reason(name, loss) or _device_reason(name, device) for name in BACKENDS if name != "auto"}


def check_backend(backend, loss: str) -> str:
    """Validates ``backend`` when a loss is built; returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"{loss}: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _machine_reason(backend, loss)
        if reason is not None:
            raise BackendUnavailableError(f"{loss}: backend={backend!r} is not available: {reason}")
    return backend


def resolve(backend: str, loss: str, op: str, device: torch.device) -> Tuple[str, Callable]:
    """The implementation of ``op`` that ``loss`` runs for tensors on ``device``: ``(backend name, callable)``."""
    check_backend(backend, loss)
    implementations = IMPLEMENTATIONS[op]
    if backend == "auto":
        for name in AUTO_PREFERENCE.get(device.type, {}).get(op, DEFAULT_PREFERENCE):
            if name in implementations and _machine_reason(name, loss) is None and _device_reason(name, device) is None:
                return name, implementations[name].load(device)
        raise AssertionError(f"{loss}: the torch backend must always be available")  # unreachable
    reason = _device_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{loss}: backend={backend!r} is not available: {reason}")
    if backend not in implementations:  # another op of the loss has this backend: torch runs this one
        return "torch", implementations["torch"].load(device)
    return backend, implementations[backend].load(device)
