"""Input checks shared by every loss.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value, shape or
device) with a message that names the argument, as FORMULAS.md requires. The checks run on metadata only
(shapes, dtypes, devices): they never synchronise with a GPU.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum")


def check_float_tensor(x, name: str, where: str, ndim: Optional[int] = None, layout: str = "") -> None:
    """``x`` must be a floating-point tensor (fp16, bf16, fp32, fp64) of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where}: `{name}` has dtype {x.dtype}; expected float16, bfloat16, float32 or float64 "
            f"(integer and boolean tensors cannot be distilled)"
        )
    if ndim is not None and x.dim() != ndim:
        shape = f" {layout}" if layout else ""
        raise ValueError(f"{where}: `{name}` must have {ndim} dimensions{shape}, got shape {tuple(x.shape)}")


def check_student_teacher(
    s, t, where: str, *, s_name: str = "s", t_name: str = "t", same_channels: bool = False
) -> None:
    """Checks a (B, C, H, W) student/teacher pair: dtypes, rank, device, batch and spatial sizes.

    ``same_channels`` is required where per-class probabilities are compared; affinity and consistency
    losses compare only affinities or scalar maps, so their channel counts may differ.
    """
    check_float_tensor(s, s_name, where, 4, "(B, C, H, W)")
    check_float_tensor(t, t_name, where, 4, "(B, C, H, W)")
    for x, name in ((s, s_name), (t, t_name)):
        if x.shape[1] == 0:
            raise ValueError(f"{where}: `{name}` has no channels (shape {tuple(x.shape)})")
    if s.device != t.device:
        raise ValueError(
            f"{where}: `{s_name}` is on {s.device} but `{t_name}` is on {t.device}; move both to one device"
        )
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"{where}: batch sizes differ: `{s_name}` has {s.shape[0]}, `{t_name}` has {t.shape[0]}"
        )
    if s.shape[2:] != t.shape[2:]:
        raise ValueError(
            f"{where}: spatial sizes differ: `{s_name}` is {s.shape[2]}x{s.shape[3]}, `{t_name}` is "
            f"{t.shape[2]}x{t.shape[3]}; resize one of them (e.g. torch.nn.functional.interpolate) "
            f"before calling"
        )
    if same_channels and s.shape[1] != t.shape[1]:
        raise ValueError(
            f"{where}: channel counts differ: `{s_name}` has {s.shape[1]}, `{t_name}` has {t.shape[1]}; "
            f"this loss compares per-class probabilities, so both must have the same classes"
        )


def check_mask(mask, logits: torch.Tensor, where: str) -> None:
    """``mask`` is None or a (B, H, W) boolean tensor on the logits' device (True = pixel counted)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: `mask` must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: `mask` must have dtype torch.bool (True = counted), got {mask.dtype}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{where}: `mask` must have shape (B, H, W) = {expected}, got {tuple(mask.shape)}"
        )
    if mask.device != logits.device:
        raise ValueError(f"{where}: `mask` is on {mask.device} but the logits are on {logits.device}")


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value, name: str, where: str, minimum: int) -> int:
    if not is_int(value):
        raise TypeError(f"{where}: `{name}` must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: `{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_bool(value, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: `{name}` must be a bool, got {value!r}")
    return value


def check_positive_float(value, name: str, where: str) -> float:
    """A finite real number > 0 (``eps``, ``temperature``)."""
    if not is_real(value):
        raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: `{name}` must be finite and > 0, got {value}")
    return float(value)


def check_nonnegative_float(value, name: str, where: str) -> float:
    """A finite real number >= 0 (loss weights)."""
    if not is_real(value):
        raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: `{name}` must be finite and >= 0, got {value}")
    return float(value)


def check_reduction(reduction, where: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_patch(patch, where: str) -> Tuple[int, int]:
    """``patch`` is an int >= 1 (square) or a pair of ints >= 1; returns ``(ph, pw)``."""
    if is_int(patch):
        size = check_int(patch, "patch", where, 1)
        return size, size
    if isinstance(patch, Sequence) and not isinstance(patch, str) and len(patch) == 2:
        return check_int(patch[0], "patch[0]", where, 1), check_int(patch[1], "patch[1]", where, 1)
    raise TypeError(f"{where}: `patch` must be an int or a pair of ints (ph, pw), got {patch!r}")


def check_pool_scale(pool_scale, where: str) -> Optional[float]:
    """``pool_scale`` is None or a real number in (0, 1] (the fraction of the map one pooling kernel spans)."""
    if pool_scale is None:
        return None
    if not is_real(pool_scale):
        raise TypeError(f"{where}: `pool_scale` must be a real number in (0, 1] or None, got {pool_scale!r}")
    if not (0 < pool_scale <= 1):
        raise ValueError(f"{where}: `pool_scale` must be in (0, 1], got {pool_scale}")
    return float(pool_scale)


def check_window(window, where: str) -> Optional[int]:
    if window is None:
        return None
    return check_int(window, "window", where, 0)


def check_choice(value, name: str, where: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{where}: `{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_probability(value, name: str, where: str) -> float:
    """A real number in [0, 1]."""
    if not is_real(value):
        raise TypeError(f"{where}: `{name}` must be a real number in [0, 1], got {value!r}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{where}: `{name}` must be in [0, 1], got {value}")
    return float(value)
