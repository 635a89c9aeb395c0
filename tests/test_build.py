"""The installed package: its compiled extension, and ``import fastkd`` without it.

These tests check the INSTALLED fastkd (run ``pytest tests`` from the repository root after
``pip install .``; ``python -m pytest`` would import the source tree instead, which has no ``_C``).
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fastkd import _extension

BUILD_INFO_KEYS = {"cuda", "torch", "cuda_version", "archs", "openmp"}


def test_extension_is_loaded_and_built_against_the_running_torch():
    info = _extension.build_info()
    assert info["loaded"], (
        f"fastkd._C is not loaded ({info['error']}); fastkd was imported from {_extension.__file__}. "
        "Install the package with `pip install .` and run `pytest tests` from the repository root."
    )
    assert info["error"] is None
    assert info["torch"] == torch.__version__, (
        f"fastkd._C was compiled against torch {info['torch']} but torch {torch.__version__} is running; "
        "rebuild it with `pip install .`"
    )
    if info["cuda"]:  # a CUDA extension can only have been built against a CUDA torch
        assert torch.version.cuda is not None


def test_build_info_op_has_the_documented_format():
    if _extension.LOAD_ERROR is not None:
        pytest.fail(f"fastkd._C is not loaded: {_extension.LOAD_ERROR}; `pip install .` first")
    raw = torch.ops.fastkd.build_info()
    assert isinstance(raw, str)
    items = raw.split(";")
    assert all("=" in item for item in items), raw
    keys = [item.partition("=")[0] for item in items]
    assert len(keys) == len(set(keys)), f"duplicate keys in {raw!r}"
    info = dict(item.partition("=")[::2] for item in items)
    assert BUILD_INFO_KEYS <= set(info), f"{raw!r} lacks {BUILD_INFO_KEYS - set(info)}"
    assert info["cuda"] in ("0", "1") and info["openmp"] in ("0", "1"), raw
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", info["torch"]), raw
    if info["cuda"] == "1":
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"]), raw
        archs = info["archs"].split(",")
        assert all(re.fullmatch(r"\d+\.\d+\w*(\+PTX)?", arch) for arch in archs), raw
    else:
        assert info["cuda_version"] == "" and info["archs"] == "", raw
    # fastkd._extension parses the same string into the same values.
    parsed = _extension.build_info()
    strings = BUILD_INFO_KEYS - {"cuda"}
    assert {key: parsed[key] for key in strings} == {key: info[key] for key in strings}
    assert parsed["cuda"] is (info["cuda"] == "1")


# Runs in a fresh interpreter, so that nothing is imported yet. `how` says how triton and fastkd._C are made
# unimportable: "broken" = a sys.meta_path finder finds them but loading raises ImportError (installed, but
# broken), "missing" = sys.modules entries of None (what `importlib.util.find_spec` reports as not installed).
_IMPORT_WITHOUT_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, importlib.util, sys

    BLOCKED = ("triton", "fastkd._C")

    def blocked(name):
        return any(name == b or name.startswith(b + ".") for b in BLOCKED)

    class Unloadable(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"{spec.name} is blocked by the test", name=spec.name)

        def exec_module(self, module):
            raise AssertionError("unreachable")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, Unloadable()) if blocked(name) else None

    if sys.argv[1] == "broken":
        sys.meta_path.insert(0, Blocker())
    else:
        for name in BLOCKED:
            sys.modules[name] = None

    import fastkd
    from fastkd import _extension

    assert not any(blocked(name) and module is not None for name, module in sys.modules.items()), sys.modules
    assert isinstance(_extension.LOAD_ERROR, str) and _extension.LOAD_ERROR, _extension.LOAD_ERROR
    assert "fastkd._C" in _extension.LOAD_ERROR, _extension.LOAD_ERROR
    info = _extension.build_info()
    assert info["loaded"] is False and info["cuda"] is False and info["error"] == _extension.LOAD_ERROR, info
    import torch
    x = torch.randn(2, 3, 6, 7)
    assert fastkd.PairwiseAffinityLoss(window=1)(x, x.flip(0)) > 0  # the torch backend needs neither
    print("OK", fastkd.__name__, _extension.LOAD_ERROR)
    """
)


@pytest.mark.parametrize("how", ["broken", "missing"])
def test_import_fastkd_without_triton_and_extension(tmp_path, how):
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_EXTENSION, how],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"import fastkd failed without triton and fastkd._C:\n{result.stderr}"
    assert result.stdout.startswith("OK fastkd "), result.stdout


def test_import_fastkd_with_triton_but_without_numpy(tmp_path):
    """A CUDA torch installs triton but not numpy: fastkd (compiled Triton kernels, no interpreter) imports."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["numpy"] = None  # not installed
        import fastkd
        from fastkd._triton import TRITON_ERROR
        assert TRITON_ERROR is None, TRITON_ERROR
        assert fastkd.PairwiseAffinityLoss.available_backends("cuda")["triton"] is None
        print("OK")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr


def test_extension_built_against_another_torch_counts_as_not_loaded(tmp_path):
    """C++ extensions are not ABI-compatible across torch releases: a mismatch disables the extension."""
    script = textwrap.dedent(
        """
        import torch
        torch.__version__ = "0.0.0"  # pretend torch was upgraded after fastkd was built
        from fastkd import _extension
        assert "built against torch" in _extension.LOAD_ERROR and "0.0.0" in _extension.LOAD_ERROR
        assert _extension.build_info()["loaded"] is False
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr


@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.build_info()["cuda"]),
                    reason="needs a GPU and the CUDA build of fastkd._C")
def test_cuda_ops_refuse_a_tensor_on_another_device():
    s = torch.randn(1, 3, 8, 8, device="cuda", requires_grad=True)
    _, difference = torch.ops.fastkd.consistency_forward(s, s.detach().flip(0), True, 1)
    with pytest.raises(RuntimeError, match="`grad_loss` is on cpu"):
        torch.ops.fastkd.consistency_backward(torch.ones((), dtype=torch.float64), s, difference, 1, 1.0)
