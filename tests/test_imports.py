"""Imports in ``fastkd`` run one way: leaves <- kernel modules (one package per op) <- the backend registry <- the
loss modules <- the ``nn.Module``s and ``functional``; no cycle, counting imports inside functions and the
modules the registry imports by name.

The graph is read from the source (``ast``), so it sees every import, run or not. Importing ``a.b.c`` also
runs the ``__init__`` of ``a.b``: those edges count too, except to the root package ``fastkd``, whose
``__init__`` is the public API and imports everything (Python hands its submodules the partly initialised
root, which they only use for submodule imports).
"""

import ast
import pathlib

import fastkd
from fastkd import _backends

ROOT = pathlib.Path(fastkd.__file__).parent
LEAVES = {"fastkd._extension", "fastkd._triton", "fastkd._validation", "fastkd.ops._common", "fastkd.ops._custom_ops",
          "fastkd.ops._graph", "fastkd.ops._per_pixel_schema",
          "fastkd.ops._triton_launch", "fastkd.ops._triton_nodes", "fastkd.ops._triton_per_pixel", "fastkd.ops.costs"}
OPS = sorted(_backends.IMPLEMENTATIONS)


def module_names():
    """{module name: source path} of every module of the package."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph():
    """{module: set of fastkd modules whose code importing it runs}."""
    names = module_names()

    def resolve(target):
        """The module an import names, and its packages up to (not including) the root ``fastkd``."""
        while target not in names:  # ``from package import name``: the package when name is not a module
            target = target.rpartition(".")[0]
        parts = target.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}

    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, node.level - 1 levels up
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.startswith("fastkd.") or target == "fastkd":
                    edges |= resolve(target) if target != "fastkd" else set()
        graph[name] = edges - {name}
    # the registry imports its implementations by name
    graph["fastkd._backends"] |= {implementation.module_name for implementations in _backends.IMPLEMENTATIONS.values()
                                  for implementation in implementations.values()}
    for implementation_module in list(graph["fastkd._backends"]):
        graph["fastkd._backends"] |= resolve(implementation_module)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "fastkd.ops.consistency.triton_backend" in graph["fastkd._backends"]  # the graph sees the registry's
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_inits_import_nothing_and_leaves_import_only_leaves():
    graph = import_graph()
    packages = {"fastkd.ops"} | {f"fastkd.ops.{op}" for op in OPS}
    for package in packages:
        assert graph[package] == set(), (package, graph[package])
    for leaf in LEAVES:
        assert graph[leaf] <= LEAVES | packages, (leaf, graph[leaf] - LEAVES)


def test_kernel_modules_import_only_leaves_and_their_own_op():
    graph = import_graph()
    for op in OPS:
        package = f"fastkd.ops.{op}"
        modules = [name for name in graph if name.startswith(package + ".")]
        assert f"{package}.torch_backend" in modules
        for module in modules:
            allowed = LEAVES | {"fastkd.ops", package} | {m for m in modules if m != module}
            assert graph[module] <= allowed, (module, graph[module] - allowed)


def test_the_registry_imports_only_leaves_and_kernel_modules():
    graph = import_graph()
    kernels = {name for name in graph if any(name.startswith(f"fastkd.ops.{op}") for op in OPS)}
    allowed = LEAVES | kernels | {"fastkd.ops"}
    assert graph["fastkd._backends"] <= allowed, graph["fastkd._backends"] - allowed


def test_loss_modules_reach_kernels_only_through_the_registry():
    graph = import_graph()
    for loss in ("pairwise_affinity_loss", "affinity_distillation_loss", "consistency_loss", "probability_loss",
                 "pixelwise_kd_loss"):
        imported = graph[f"fastkd.ops.{loss}"]
        assert "fastkd._backends" in imported
        assert not any(name.startswith(f"fastkd.ops.{op}") for name in imported for op in OPS), (loss, imported)


def test_every_op_has_one_name_in_python_csrc_and_tests():
    """``fastkd/ops/<op>/``, ``csrc/<op>/`` (for the ops with kernels) and ``tests/test_<op>.py`` (the two
    torch-only per-pixel ops, whose tests are the same checks, share ``tests/test_pixel_losses.py``)."""
    repository = pathlib.Path(__file__).resolve().parent.parent  # the checkout (fastkd may be installed elsewhere)
    for op in OPS:
        assert (ROOT / "ops" / op / "__init__.py").exists()
        test_module = "test_pixel_losses.py" if op in ("pixelwise_kd", "probability") else f"test_{op}.py"
        assert (repository / "tests" / test_module).exists(), op
        if "cuda" in _backends.IMPLEMENTATIONS[op]:
            assert (repository / "csrc" / op / f"{op}_schema.cpp").exists(), op
