"""How setup.py finds the CUDA toolkit (cuda_toolkit.py beside it): through CUDA_HOME, an nvcc on PATH that is
the toolkit's own, a symlink or a wrapper script, or a standard folder; and what it says where no folder has
the headers. Fake toolkits in tmp_path; the real build is checked by the CUDA leg of .ci/run."""

import importlib.util
import os
import pathlib
import stat

import pytest

_spec = importlib.util.spec_from_file_location(
    "cuda_toolkit", pathlib.Path(__file__).resolve().parent.parent / "cuda_toolkit.py")
cuda_toolkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_toolkit)


def executable(path: pathlib.Path, text: str = "#!/bin/sh\nexit 0\n") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def toolkit(folder: pathlib.Path, headers: bool = True) -> pathlib.Path:
    """A fake toolkit: bin/nvcc and, with headers, include/cuda.h and include/cuda_runtime.h."""
    executable(folder / "bin" / "nvcc")
    if headers:
        (folder / "include").mkdir(parents=True)
        for header in ("cuda.h", "cuda_runtime.h"):
            (folder / "include" / header).write_text("#pragma once\n")
    return folder


def find(path_dirs=(), standard_folders=(), **env):
    return cuda_toolkit.find_cuda_toolkit(env={"PATH": os.pathsep.join(map(str, path_dirs)), **env},
                                          standard_folders=[str(folder) for folder in standard_folders])


def test_nvcc_on_path_inside_its_toolkit(tmp_path):
    home = toolkit(tmp_path / "cuda")
    found = find([home / "bin"])
    assert found.home == str(home) and "nvcc on PATH" in found.origin


def test_nvcc_on_path_through_a_symlink(tmp_path):
    home = toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    assert find([tmp_path / "bin"]).home == str(home)


def test_nvcc_on_path_as_a_wrapper_script_is_asked_for_its_toolkit(tmp_path):
    # The machine's case: /usr/local/bin/nvcc runs the toolkit's nvcc, so the folder above it has no headers.
    home = toolkit(tmp_path / "cuda-13.0")
    executable(tmp_path / "usr" / "bin" / "nvcc", f'#!/bin/sh\necho "#$ TOP={home}/bin/.." >&2\n')
    found = find([tmp_path / "usr" / "bin"])
    assert found.home == str(home) and "reports" in found.origin


def test_cuda_home_is_used_alone_and_checked(tmp_path):
    home = toolkit(tmp_path / "chosen")
    other = toolkit(tmp_path / "other")
    assert find([other / "bin"], CUDA_HOME=str(home)) == cuda_toolkit.Toolkit(str(home), "$CUDA_HOME")
    assert find(CUDA_PATH=str(home)).home == str(home)
    headerless = toolkit(tmp_path / "headerless", headers=False)
    with pytest.raises(cuda_toolkit.ToolkitNotFound) as error:
        find([other / "bin"], CUDA_HOME=str(headerless))  # an explicit choice is not second-guessed
    assert str(headerless) in str(error.value) and "$CUDA_HOME" in str(error.value)
    assert "include/cuda.h" in str(error.value) and "CUDA_HOME=" in str(error.value)


def test_no_headers_anywhere_stops_saying_where_it_looked(tmp_path):
    headerless = toolkit(tmp_path / "cuda", headers=False)
    with pytest.raises(cuda_toolkit.ToolkitNotFound) as error:
        find([headerless / "bin"], standard_folders=[tmp_path / "missing"])
    message = str(error.value)
    assert f"{headerless} (the nvcc on PATH" in message and "no include/cuda.h" in message
    assert "FASTKD_CPU_ONLY=1" in message and str(tmp_path / "missing") not in message  # absent folders: skipped


def test_standard_folders_newest_version_first(tmp_path):
    for version in ("12.4", "13.0", "12.10"):
        toolkit(tmp_path / f"cuda-{version}")
    found = find([tmp_path / "empty"], standard_folders=[tmp_path / "cuda", tmp_path / "cuda-*"])
    assert found.home == str(tmp_path / "cuda-13.0") and found.origin == "a standard install folder"


def test_no_nvcc_at_all_means_no_cuda_build(tmp_path):
    assert find([tmp_path], standard_folders=[tmp_path / "cuda"]) is None
