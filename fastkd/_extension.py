"""Loading the compiled extension ``fastkd._C``, which is optional.

``import fastkd`` must work without a compiler, a GPU or triton, so a missing or broken extension is not an
error here: it is recorded in ``LOAD_ERROR``, and the ``cuda`` backend reports it as the reason it is
unavailable. An extension built against another torch than the running one is treated as broken too
(C++ extensions are not ABI-compatible across torch releases).
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

LOAD_ERROR: Optional[str] = None
try:
    _C = importlib.import_module("fastkd._C")  # importing registers the torch.ops.fastkd operators
except ImportError as error:  # not built (pure-Python install, or running from a source tree)
    _C = None
    LOAD_ERROR = f"fastkd._C is not built ({error}); reinstall with `pip install .` and a C++ compiler"
except OSError as error:  # built against another torch: undefined symbols, wrong ABI
    _C = None
    LOAD_ERROR = f"fastkd._C failed to load ({error}); rebuild it against the installed torch"


def _compiled_info() -> Dict[str, str]:
    """``torch.ops.fastkd.build_info()``, "key=value;..." as a dict (empty if the library did not load)."""
    if _C is None:
        return {}
    return dict(item.partition("=")[::2] for item in torch.ops.fastkd.build_info().split(";"))


if _C is not None and _compiled_info().get("torch") != torch.__version__:
    LOAD_ERROR = (
        f"fastkd._C was built against torch {_compiled_info().get('torch')} but torch {torch.__version__} "
        f"is running; rebuild it with `pip install .`"
    )


def build_info() -> Dict[str, object]:
    """What the extension was built with: ``{"loaded", "error", "cuda", "torch", "cuda_version", "archs",
    "openmp"}``; ``loaded`` is True only for an extension that loaded and matches the running torch."""
    info: Dict[str, object] = dict(_compiled_info())
    info.update(loaded=LOAD_ERROR is None, error=LOAD_ERROR, cuda=info.get("cuda") == "1")
    return info
