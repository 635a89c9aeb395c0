"""What every op's ``schema`` module does first with a backend's pair of custom ops (a leaf: torch only)."""

from __future__ import annotations

from typing import Callable, Tuple

import torch


def op_pair(namespace: str, op: str, fake_forward: Callable, fake_backward: Callable) -> Tuple[object, object]:
    """Registers the fake implementations (for ``torch.compile``) of ``<namespace>::<op>_forward`` and
    ``<op>_backward`` and returns the two ops (``OpOverload``s)."""
    for suffix, fake in (("forward", fake_forward), ("backward", fake_backward)):
        torch.library.register_fake(f"{namespace}::{op}_{suffix}", fake)
    ops = getattr(torch.ops, namespace)
    return getattr(ops, f"{op}_forward").default, getattr(ops, f"{op}_backward").default
