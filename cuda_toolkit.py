"""Finding the CUDA toolkit that setup.py builds ``fastkd._C`` with (build-time only; not installed).

torch guesses ``CUDA_HOME`` as the parent of the folder of the first ``nvcc`` on ``PATH``. That guess is
wrong for an ``nvcc`` that is a symlink or a wrapper script outside the toolkit (``/usr/local/bin/nvcc``
running ``/usr/local/cuda-13.0/bin/nvcc``): the guessed folder has no ``include/cuda.h``, and the build
stops at the first C++ file. Here a folder counts as a toolkit only when it has both ``bin/nvcc`` and the
headers, and the candidates are tried in this order:

1. ``$CUDA_HOME``, else ``$CUDA_PATH``: the user's explicit choice, the only candidate when set;
2. the ``nvcc`` on ``PATH``: the folder above its real location (symlinks followed), then the toolkit
   nvcc itself reports (``nvcc --dryrun`` prints ``#$ TOP=<toolkit>/bin/..``, also through a wrapper);
3. the usual install folders: ``/usr/local/cuda``, ``/usr/local/cuda-<version>`` (newest first),
   ``/opt/cuda``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

HEADERS = ("cuda.h", "cuda_runtime.h")  # what the extension's C++ glue includes from the toolkit
STANDARD_FOLDERS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")


class Toolkit(NamedTuple):
    home: str  # the folder to use as CUDA_HOME
    origin: str  # how it was found, for the build log


class ToolkitNotFound(Exception):
    """An nvcc exists (or CUDA_HOME was set) but no candidate folder has nvcc and the headers together."""


def _missing(folder: str) -> List[str]:
    """What a toolkit needs that ``folder`` lacks."""
    needed = [os.path.join("bin", "nvcc")] + [os.path.join("include", header) for header in HEADERS]
    return [path for path in needed if not os.path.isfile(os.path.join(folder, path))]


def _reported_top(nvcc: str) -> Optional[str]:
    """The toolkit folder nvcc itself reports (``#$ TOP=...`` in ``nvcc --dryrun``), or None."""
    try:
        result = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                                check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def _version_key(folder: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", os.path.basename(folder)))


def _standard_folders(patterns: Sequence[str]) -> Iterator[str]:
    for pattern in patterns:
        if glob.has_magic(pattern):
            yield from sorted(glob.glob(pattern), key=_version_key, reverse=True)
        else:
            yield pattern


def _candidates(env: Mapping[str, str], standard_folders: Sequence[str]) -> Iterator[Tuple[str, str]]:
    """(folder, origin) pairs in the order of the module docstring."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(variable):
            yield os.path.normpath(env[variable]), f"${variable}"
            return
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if nvcc:
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"the nvcc on PATH ({nvcc})"
        top = _reported_top(nvcc)
        if top:
            yield top, f"the toolkit the nvcc on PATH reports ({nvcc} --dryrun)"
    for folder in _standard_folders(standard_folders):
        yield os.path.normpath(folder), "a standard install folder"


def find_cuda_toolkit(env: Optional[Mapping[str, str]] = None,
                      standard_folders: Sequence[str] = STANDARD_FOLDERS) -> Optional[Toolkit]:
    """The first candidate folder with ``bin/nvcc`` and the headers; None where there is no nvcc at all.

    Raises ToolkitNotFound, naming every folder looked at and what it lacked, where an nvcc was found (or
    CUDA_HOME/CUDA_PATH was set) but no folder has the headers beside it.
    """
    env = os.environ if env is None else env
    looked, any_nvcc = [], False
    for folder, origin in _candidates(env, standard_folders):
        explicit = origin.startswith("$")
        if not explicit and not os.path.isdir(folder):
            continue  # a standard folder that is not there
        missing = _missing(folder)
        if not missing:
            return Toolkit(folder, origin)
        any_nvcc = any_nvcc or explicit or "nvcc on PATH" in origin or os.path.join("bin", "nvcc") not in missing
        looked.append(f"  {folder} ({origin}): no {', no '.join(missing)}")
    if not any_nvcc:
        return None
    raise ToolkitNotFound(
        "the CUDA extension needs a CUDA toolkit folder with bin/nvcc and include/{" + ",".join(HEADERS)
        + "}; looked in:\n" + "\n".join(looked) + "\n"
        "  Set CUDA_HOME to the toolkit (the folder holding bin/nvcc and include/cuda.h, e.g.\n"
        "  CUDA_HOME=/usr/local/cuda-13.0 pip install .), or FASTKD_CPU_ONLY=1 to build without CUDA."
    )
