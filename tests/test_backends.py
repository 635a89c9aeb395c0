"""Backend selection: names, availability with reasons, and what ``auto`` picks."""

import pytest
import torch

import fastkd
from fastkd import _backends, _extension, _triton

OPS = ["affinity_full", "affinity_window", "consistency", "pixelwise_kd", "probability"]
MODULES = [fastkd.PairwiseAffinityLoss, fastkd.AffinityDistillationLoss, fastkd.ConsistencyLoss,
           fastkd.ProbabilityLoss, fastkd.PixelwiseKDLoss]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_auto_and_torch_run_on_cpu(module):
    """auto takes the cpp implementation where the extension is built (every loss has one), else torch; both
    agree."""
    s = torch.randn(2, 3, 6, 7)
    has_cpp = _extension.LOAD_ERROR is None
    t = 0.5 * s + torch.randn(2, 3, 6, 7)  # not a shift of s: the per-pixel losses are shift-invariant
    expected = module(backend="cpp" if has_cpp else "torch")(s, t)
    assert torch.equal(module(backend="auto")(s, t), expected)
    torch.testing.assert_close(module(backend="torch")(s, t), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("module,backend", [(fastkd.AffinityDistillationLoss, "cpp"), (fastkd.ConsistencyLoss, "cuda")],
                         ids=lambda x: getattr(x, "__name__", x))
def test_unavailable_backend_is_refused_with_a_reason(module, backend, monkeypatch):
    """Building a loss with a backend that has no kernel for it says so, naming the loss. (Every loss has every
    backend today: the registry is stripped of one.)"""
    for op in _backends.LOSS_OPS[module.__name__]:
        monkeypatch.setitem(_backends.IMPLEMENTATIONS, op,
                            {name: impl for name, impl in _backends.IMPLEMENTATIONS[op].items() if name != backend})
    with pytest.raises(fastkd.BackendUnavailableError,
                       match=rf"{module.__name__}: backend='{backend}' is not available: fastkd has no {backend} "
                             rf"implementation of {module.__name__} yet"):
        module(backend=backend)
    assert issubclass(fastkd.BackendUnavailableError, ValueError)


@pytest.mark.parametrize("op,backends", [("consistency", ("cuda", "cpp")), ("affinity_window", ("cuda", "cpp")),
                                        ("affinity_full", ("cuda", "cpp")), ("pixelwise_kd", ("cuda", "cpp")),
                                        ("probability", ("cuda", "cpp"))])
def test_the_compiled_backends_run_where_the_extension_loads(op, backends):
    for backend in backends:
        assert backend in _backends.IMPLEMENTATIONS[op]
        loss = next(name for name, ops in _backends.LOSS_OPS.items() if op in ops)
        assert (_backends._machine_reason(backend, loss) is None) == (_extension.LOAD_ERROR is None)


@pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason="fastkd._C is not loaded")
def test_auto_takes_the_cpp_kernels_on_cpu_tensors():
    cpu = torch.device("cpu")
    for loss, op in [("ConsistencyLoss", "consistency"), ("PixelwiseKDLoss", "pixelwise_kd"),
                     ("ProbabilityLoss", "probability"), ("PairwiseAffinityLoss", "affinity_window"),
                     ("PairwiseAffinityLoss", "affinity_full"), ("AffinityDistillationLoss", "affinity_full")]:
        assert _backends.resolve("auto", loss, op, cpu)[0] == "cpp", (loss, op)
    with pytest.raises(fastkd.BackendUnavailableError, match=r"the cpp backend runs on CPU tensors"):
        _backends.resolve("cpp", "ConsistencyLoss", "consistency", torch.device("cuda"))


@pytest.mark.parametrize("op", OPS)
def test_the_memory_heavy_ops_have_triton_kernels_that_run_where_triton_imports(op):
    assert "triton" in _backends.IMPLEMENTATIONS[op]
    loss = next(name for name, ops in _backends.LOSS_OPS.items() if op in ops)
    assert (_backends._machine_reason("triton", loss) is None) == (_triton.TRITON_ERROR is None)


def fake_registry(monkeypatch, *backends):
    """Replaces the registry with one op, "op", of one loss, "Loss", implemented by ``backends``."""
    table = {name: _backends.Implementation("consistency", "torch_backend", "consistency_sum") for name in backends}
    monkeypatch.setattr(_backends, "IMPLEMENTATIONS", {"op": table})
    monkeypatch.setattr(_backends, "LOSS_OPS", {"Loss": ("op",)})
    monkeypatch.setattr(_backends, "AUTO_PREFERENCE", {"cuda": {"op": ("cuda", "triton", "torch")},
                                                       "cpu": {"op": ("cpp", "torch")}})
    return table


def test_auto_orders_every_op_on_each_device_with_torch_last():
    for device, orders in _backends.AUTO_PREFERENCE.items():
        assert sorted(orders) == sorted(OPS), device
        for op, order in orders.items():
            assert order[-1] == "torch" and set(order) <= set(_backends.IMPLEMENTATIONS[op]), (device, op)


def test_auto_on_cuda_tensors_takes_the_faster_kernel_per_op_as_the_evidence_table_says(monkeypatch):
    """The order the README states, decided by benchmarks/results/kernel-evidence/evidence.md."""
    monkeypatch.setattr(_triton, "TRITON_ERROR", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"loaded": True, "cuda": True})
    expected = {"affinity_full": "cuda", "affinity_window": "cuda", "consistency": "triton",
                "pixelwise_kd": "cuda", "probability": "cuda"}
    for loss, ops in _backends.LOSS_OPS.items():
        for op in ops:
            assert _backends.resolve("auto", loss, op, torch.device("cuda"))[0] == expected[op], (loss, op)


def test_auto_prefers_fused_kernels_on_cuda_tensors_and_torch_elsewhere(monkeypatch):
    table = fake_registry(monkeypatch, "torch", "triton", "cuda")
    monkeypatch.setattr(_triton, "TRITON_ERROR", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"loaded": True, "cuda": True})
    assert _backends.resolve("auto", "Loss", "op", torch.device("cuda"))[0] == "cuda"
    assert _backends.resolve("auto", "Loss", "op", torch.device("cpu"))[0] == "torch"
    del table["cuda"]
    assert _backends.resolve("auto", "Loss", "op", torch.device("cuda"))[0] == "triton"


def test_device_reasons(monkeypatch):
    fake_registry(monkeypatch, "torch", "triton", "cuda")
    monkeypatch.setattr(_triton, "TRITON_ERROR", None)
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"loaded": True, "cuda": False})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTKD_EMULATE_CUDA", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(fastkd.BackendUnavailableError, match=r"Triton kernels run on CUDA tensors .* TRITON_INTERPRET=1"):
        _backends.resolve("triton", "Loss", "op", cpu)
    with pytest.raises(fastkd.BackendUnavailableError, match=r"FASTKD_EMULATE_CUDA=1"):
        _backends.resolve("cuda", "Loss", "op", cpu)
    with pytest.raises(fastkd.BackendUnavailableError, match=r"built without CUDA"):
        _backends.resolve("cuda", "Loss", "op", cuda)
    assert _backends.resolve("auto", "Loss", "op", cuda)[0] == "triton"  # cuda skipped: not built
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTKD_EMULATE_CUDA", "1")
    assert _backends.resolve("triton", "Loss", "op", cpu)[0] == "triton"
    assert _backends.resolve("cuda", "Loss", "op", cpu)[0] == "cuda"


def test_machine_reasons(monkeypatch):
    fake_registry(monkeypatch, "torch", "triton", "cuda")
    monkeypatch.setattr(_triton, "TRITON_ERROR", "triton is not installed (`pip install triton`)")
    monkeypatch.setattr(_extension, "LOAD_ERROR", "fastkd._C is not built (no module)")
    with pytest.raises(fastkd.BackendUnavailableError, match=r"triton is not installed"):
        _backends.check_backend("triton", "Loss")
    with pytest.raises(fastkd.BackendUnavailableError, match=r"fastkd._C is not built"):
        _backends.check_backend("cuda", "Loss")
    assert _backends.resolve("auto", "Loss", "op", torch.device("cuda"))[0] == "torch"
    monkeypatch.setattr(_triton, "TRITON_ERROR", "triton cannot be imported (ImportError: libcuda)")
    with pytest.raises(fastkd.BackendUnavailableError, match=r"triton cannot be imported \(ImportError: libcuda\)"):
        _backends.check_backend("triton", "Loss")


def test_every_op_has_a_torch_implementation_and_every_loss_runs_registered_ops():
    assert sorted(_backends.IMPLEMENTATIONS) == sorted(OPS)
    for op in OPS:
        assert "torch" in _backends.IMPLEMENTATIONS[op]
        for backend, implementation in _backends.IMPLEMENTATIONS[op].items():
            assert backend in fastkd.BACKENDS and implementation.op == op
    assert sorted({op for ops in _backends.LOSS_OPS.values() for op in ops}) == sorted(OPS)
    assert all(loss.endswith("Loss") and hasattr(fastkd, loss) for loss in _backends.LOSS_OPS)


@pytest.mark.parametrize("loss_class", [fastkd.PairwiseAffinityLoss, fastkd.AffinityDistillationLoss,
                                        fastkd.ConsistencyLoss, fastkd.ProbabilityLoss, fastkd.PixelwiseKDLoss])
def test_available_backends_says_which_run_here_and_why_the_others_do_not(loss_class):
    availability = loss_class.available_backends("cpu")
    assert set(availability) == set(fastkd.BACKENDS) - {"auto"}
    assert availability["torch"] is None
    for backend, reason in availability.items():
        if reason is None:
            loss_class(backend=backend)  # can be built
        else:
            assert isinstance(reason, str) and reason
    if not any("cpp" in _backends.IMPLEMENTATIONS[op] for op in _backends.LOSS_OPS[loss_class.__name__]):
        assert "no cpp implementation" in availability["cpp"]
