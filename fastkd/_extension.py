"""Loading the compiled extension ``fastkd._C``, which is optional.

``import fastkd`` must work without a compiler, a GPU or triton, so a missing or broken extension is not an
error here: it is recorded, and the ``cuda`` backend reports it as the reason it is unavailable.
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


def build_info() -> Dict[str, object]:
    """What the extension was built with: ``{"loaded", "error", "cuda", "torch", "cuda_version", "archs"}``."""
    info: Dict[str, object] = {"loaded": _C is not None, "error": LOAD_ERROR, "cuda": False}
    if _C is None:
        return info
    for item in torch.ops.fastkd.build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = value
    info["cuda"] = info.get("cuda") == "1"
    return info
