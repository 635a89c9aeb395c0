"""Backend selection: ``backend="auto" | "torch" | "triton" | "cuda" | "cpp"``.

Every op module keeps a table ``{backend name: implementation}``. The ``torch`` implementation exists for
every op and runs on any device; ``triton`` and ``cuda`` (GPU kernels) and ``cpp`` (parallel C++ for CPU
tensors, in ``fastkd._C``) implementations are added to the tables by the kernel modules as they land. ``auto`` takes the first available backend in :data:`AUTO_PREFERENCE` for the
tensor's device type, skipping implementations marked ``auto = False`` (not faster than the next one: they
run only when asked for by name).

An unknown name is a ``ValueError`` when the loss is built; a backend that cannot run is a
:class:`BackendUnavailableError` (a ``ValueError``) that says why: at construction when the reason does not
depend on the input (not installed, not built, no kernel for this op), at call time when it does (device).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

from fastkd import _extension

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")

# The order ``auto`` tries, per device type. The fused kernels are faster than the torch path wherever
# they can run (on CPU: the cpp consistency loss took 0.14-0.65x the torch backend's time and a tenth of its
# memory in benchmarks/run.py); ``torch`` is always last and always available.
AUTO_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
DEFAULT_PREFERENCE = ("torch",)


class BackendUnavailableError(ValueError):
    """The requested backend exists but cannot run this op here; the message says why."""


def _machine_reason(backend: str, op: str, implementations: Dict[str, Callable]) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on this machine at all, or None if it might."""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (`pip install triton`)"
        from fastkd.triton_kernels import TRITON_ERROR  # imports triton

        if TRITON_ERROR is not None:
            return TRITON_ERROR
    if backend not in implementations:
        return f"fastkd has no {backend} implementation of {op} yet"
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


def availability(op: str, implementations: Dict[str, Callable], device: torch.device) -> Dict[str, Optional[str]]:
    """``{backend: None if it can run op on tensors of device, else the reason}`` for every backend but auto."""
    return {name: _machine_reason(name, op, implementations) or _device_reason(name, device)
            for name in BACKENDS if name != "auto"}


def check_backend(backend, op: str, implementations: Dict[str, Callable]) -> str:
    """Validates ``backend`` when a loss is built; returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _machine_reason(backend, op, implementations)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend={backend!r} is not available: {reason}")
    return backend


def resolve_backend(backend: str, op: str, implementations: Dict[str, Callable], device: torch.device):
    """The implementation to run for tensors on ``device``: ``(name, callable)``."""
    check_backend(backend, op, implementations)
    if backend == "auto":
        for name in AUTO_PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
            if _machine_reason(name, op, implementations) is None and _device_reason(name, device) is None \
                    and getattr(implementations[name], "auto", True):  # auto = False: by name only
                return name, implementations[name]
        raise AssertionError(f"{op}: the torch backend must always be available")  # unreachable
    reason = _device_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} is not available: {reason}")
    return backend, implementations[backend]
