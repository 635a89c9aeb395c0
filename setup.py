"""Build script for fastkd and its compiled extension ``fastkd._C`` (sources in ``csrc/``).

The extension is compiled against the torch that is ALREADY INSTALLED in the target environment; torch is
deliberately not a build requirement in pyproject.toml, so ``pip install .`` never downloads one (see
``_import_installed_torch`` for how this works inside pip's isolated build environment).

What gets built is chosen by environment variables (``1/true/yes/on`` or ``0/false/no/off``, unset = off):

default
    A CUDA extension (``CUDAExtension``: every ``csrc/**/*.cu`` plus the C++ files, ``-DFASTKD_WITH_CUDA``)
    when the installed torch was built with CUDA (``torch.version.cuda``) and a CUDA toolkit is found (see
    ``cuda_toolkit.py``: ``$CUDA_HOME`` or ``$CUDA_PATH``; else the toolkit of the ``nvcc`` on ``PATH``,
    followed through symlinks and, for a wrapper script, asked of nvcc itself; else ``/usr/local/cuda``,
    ``/usr/local/cuda-*``, ``/opt/cuda``). A toolkit counts only with ``bin/nvcc`` and ``include/cuda.h``;
    where nvcc exists but no folder has the headers, the build stops before compiling and says what it
    looked for. No GPU is needed to build. Otherwise a CPU-only ``CppExtension`` (C++ files only).
``FASTKD_FORCE_CUDA=1``
    Require the CUDA extension (e.g. on a build machine without a GPU): fail with an explanation instead of
    falling back to CPU-only when torch is CPU-only or nvcc is missing.
``FASTKD_CPU_ONLY=1``
    Build the CPU-only extension even where CUDA is available.
``FASTKD_NO_EXTENSION=1``
    Pure-Python install: no ``fastkd._C``, no compiler and no torch needed at build time. ``import fastkd``
    and its ``torch`` backend work; the ``cuda`` backend reports that the extension is not built.
``TORCH_CUDA_ARCH_LIST``
    GPU architectures for the CUDA extension (torch's variable, e.g. ``"8.0;9.0+PTX"``; 8.0 or newer: the
    kernels use FP64 ``mma.sync``, and an older one stops the build with that reason). Default for
    fastkd: ``"8.0;8.6;8.9;9.0+PTX"`` (SASS for A100/A30, RTX 30/A10/A40, RTX 40/L4/L40, H100/H200, and
    compute_90 PTX that newer GPUs, sm_100 and sm_120, compile when the extension loads), so the result does
    not depend on the GPU of the build machine. sm_80 SASS would run on sm_86/sm_89 too, but ptxas schedules
    and allocates registers differently for them; the two cost about 20 s of a several-minute build.
``MAX_JOBS``
    Number of parallel compile jobs (torch's variable; used when ninja is available, which
    pyproject.toml provides in the isolated build environment).

Compiler flags: ``-O3`` for both host compiler and nvcc, ``-Wall -Wextra`` for the C++ files (which compile
warning-free; torch's headers are included as system headers), ``-fopenmp`` at compile time on Linux when torch itself uses OpenMP (not at link time: the
OpenMP runtime torch already loaded is used). The C++ standard is the one torch's BuildExtension passes
(``-std=c++17`` up to some 2.x release, ``-std=c++20`` since; torch 2.13's headers warn under C++17);
fastkd's own code only needs C++17. ``torch.ops.fastkd.build_info()`` reports what was built.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
GENERATED_INCLUDE = os.path.join(ROOT, "build", "generated")  # fastkd_build_config.h, see _write_build_config

sys.path.insert(0, ROOT)  # cuda_toolkit.py beside this file (not every build backend puts ROOT on sys.path)
from cuda_toolkit import STANDARD_FOLDERS, ToolkitNotFound, find_cuda_toolkit  # noqa: E402


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    sys.exit(f"error: {name}={os.environ[name]!r} is not a boolean (use 1 or 0)")


def _import_installed_torch():
    """Imports the torch installed in the environment pip is installing into.

    With pip's default build isolation this script runs in a temporary environment that only contains the
    build requirements: pip sets PYTHONPATH to an overlay whose sitecustomize hides the real site-packages,
    and sets PYTHONNOUSERSITE. Torch is intentionally not a build requirement (pip would download a second,
    multi-GB torch and compile against that one instead of the installed one), so when ``import torch``
    fails we ask the same interpreter, with those variables removed and from a neutral working directory
    (so nothing in the source tree shadows a module), where torch lives, and append that site-packages
    directory to sys.path. Appending keeps the build requirements (setuptools) ahead of the target's copies.
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = (
        "import importlib.util, os\n"
        "spec = importlib.util.find_spec('torch')\n"
        "print(os.path.dirname(list(spec.submodule_search_locations)[0]) if spec else '')\n"
    )
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            [sys.executable, "-c", probe], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False,
        )
    site_dir = result.stdout.strip() if result.returncode == 0 else ""
    if site_dir:
        sys.path.append(site_dir)
        try:
            import torch

            print(f"fastkd: using the installed torch from {site_dir} (outside the build environment)",
                  file=sys.stderr)
            return torch
        except ImportError as error:
            sys.exit(f"error: fastkd found torch in {site_dir} but cannot import it: {error}")
    sys.exit(
        f"error: building fastkd._C needs PyTorch installed first, and {sys.executable} cannot import torch.\n"
        "  Install torch, then `pip install .` again (or `pip install --no-build-isolation .`),\n"
        "  or set FASTKD_NO_EXTENSION=1 for a pure-Python install without the compiled extension."
    )


def _write_build_config(torch_version: str, archs: str) -> None:
    """Writes ``fastkd_build_config.h``: the facts ``build_info()`` reports, as C string literals.

    A header, not ``-D`` values: nvcc splits ``-D`` values at commas, and quotes do not survive both the
    ninja and the plain setuptools build paths. Rewritten only when it changes, so rebuilds stay incremental.
    """
    def literal(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    text = ("// Generated by setup.py for csrc/extension.cpp; do not edit.\n#pragma once\n"
            f"#define FASTKD_BUILD_TORCH_VERSION {literal(torch_version)}\n"
            f"#define FASTKD_BUILD_CUDA_ARCHS {literal(archs)}\n")
    path = os.path.join(GENERATED_INCLUDE, "fastkd_build_config.h")
    os.makedirs(GENERATED_INCLUDE, exist_ok=True)
    if os.path.exists(path):
        with open(path) as header:
            if header.read() == text:
                return
    with open(path, "w") as header:
        header.write(text)


def _sources(*patterns: str):
    found = set()
    for pattern in patterns:
        found.update(glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))
    return sorted(os.path.relpath(path, ROOT) for path in found)


def _extensions():
    """``(ext_modules, cmdclass)`` for the requested build."""
    no_extension, cpu_only, force_cuda = (
        _flag("FASTKD_NO_EXTENSION"), _flag("FASTKD_CPU_ONLY"), _flag("FASTKD_FORCE_CUDA"),
    )
    if force_cuda and (cpu_only or no_extension):
        sys.exit("error: FASTKD_FORCE_CUDA=1 contradicts FASTKD_CPU_ONLY=1 / FASTKD_NO_EXTENSION=1; set one")
    if no_extension:
        print("fastkd: FASTKD_NO_EXTENSION=1, pure-Python install without fastkd._C", file=sys.stderr)
        return [], {}

    torch = _import_installed_torch()
    toolkit = None
    if torch.version.cuda is not None and not cpu_only:
        try:
            toolkit = find_cuda_toolkit()
        except ToolkitNotFound as error:
            sys.exit(f"error: fastkd: {error}")
        if toolkit is not None:
            # torch reads CUDA_HOME when torch.utils.cpp_extension is first imported (just below); its own
            # guess, the folder above the first nvcc on PATH, has no headers when that nvcc is a wrapper.
            os.environ["CUDA_HOME"] = toolkit.home
            print(f"fastkd: CUDA toolkit {toolkit.home} (from {toolkit.origin})", file=sys.stderr)
    from torch.utils import cpp_extension

    if toolkit is not None and cpp_extension.CUDA_HOME != toolkit.home:
        cpp_extension.CUDA_HOME = toolkit.home  # imported earlier by something else, with torch's guess
    with_cuda = toolkit is not None
    if force_cuda and not with_cuda:
        if torch.version.cuda is None:
            reason = (f"the installed torch {torch.__version__} ({os.path.dirname(torch.__file__)}) is built "
                      "without CUDA (torch.version.cuda is None); install a CUDA build of torch")
        else:
            reason = ("no nvcc was found ($CUDA_HOME and $CUDA_PATH unset, no nvcc on PATH, none in "
                      f"{', '.join(STANDARD_FOLDERS)}); set CUDA_HOME to the CUDA toolkit or put nvcc on PATH")
        sys.exit(f"error: FASTKD_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}.")

    # No -std flag: torch's BuildExtension adds the standard its headers need (c++17 for older torch,
    # c++20 for recent releases, whose headers warn under c++17). fastkd's own code is C++17.
    # -fno-trapping-math: nothing reads floating-point exception flags, and without it GCC will not vectorise a
    # loop with a floating-point comparison (the CPU per-pixel kernels' exp clamps its argument). Results do not
    # change: it is not -ffast-math.
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-fno-trapping-math"]
    # torch's headers as system headers, so that -Wall -Wextra report fastkd's own code only (torch 2.13's
    # headers have unused parameters). GCC ignores the -I of a directory that is also an -isystem one.
    cxx_flags += ["-isystem" + path for path in cpp_extension.include_paths()]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
    arch_list = ""
    defines = []  # flags only: no -D values (see _write_build_config)
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch when it builds the nvcc -gencode flags
        defines.append("-DFASTKD_WITH_CUDA")
    _write_build_config(torch.__version__, ",".join(arch for arch in re.split(r"[;\s]+", arch_list) if arch))
    if with_cuda:
        extension = cpp_extension.CUDAExtension(
            "fastkd._C",
            sources=_sources("*.cpp", "*.cu"),
            include_dirs=[GENERATED_INCLUDE],
            extra_compile_args={"cxx": cxx_flags + defines, "nvcc": ["-O3", "-lineinfo"] + defines},
        )
        summary = f"CUDA extension (CUDA {torch.version.cuda}, toolkit {toolkit.home}, archs {arch_list})"
    else:
        extension = cpp_extension.CppExtension(
            "fastkd._C", sources=_sources("*.cpp"), include_dirs=[GENERATED_INCLUDE],
            extra_compile_args={"cxx": cxx_flags + defines},
        )
        why = ("FASTKD_CPU_ONLY=1" if cpu_only else
               "torch is built without CUDA" if torch.version.cuda is None else "no nvcc found")
        summary = f"CPU-only extension ({why})"
    print(f"fastkd: building fastkd._C as a {summary} against torch {torch.__version__}", file=sys.stderr)
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    package_data={"fastkd.ops": ["NOTES.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
