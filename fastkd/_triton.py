"""Whether Triton can be imported here: ``TRITON_ERROR`` is None, or the reason the ``triton`` backend cannot run.

A leaf: it imports triton (where installed) and nothing of fastkd, so the backend registry can ask without
importing a kernel module.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

TRITON_ERROR: Optional[str]
if importlib.util.find_spec("triton") is None:
    TRITON_ERROR = "triton is not installed (`pip install triton`)"
else:
    try:
        import triton  # noqa: F401
    except Exception as error:  # installed but broken: the torch backend still works
        TRITON_ERROR = f"triton cannot be imported ({type(error).__name__}: {error}); `pip install triton`"
    else:
        TRITON_ERROR = None
