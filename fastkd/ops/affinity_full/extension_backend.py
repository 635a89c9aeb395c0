"""The ``cuda`` and ``cpp`` backends of the ``affinity_full`` op: ``fastkd._C``'s compiled ops (``csrc/affinity_full/``,
``csrc/common/pool_nodes_*.cpp``).

``cuda``: ``fastkd::affinity_full_forward`` / ``_backward`` have the CUDA kernels (``affinity_full.cu``, the
algorithms of :mod:`fastkd.ops.affinity_full.triton_backend`, whose docstring has the math) on the CUDA key and
no CPU kernel; ``fastkd_emulated::...`` runs the CUDA kernel sources on CPU tensors through the emulator.
Everything is accumulated in float64, without atomics: the result is the same on every run.

``cpp``: the torch backend's Gram and direct paths (:func:`fastkd.ops.affinity_full.torch_backend.full_graph_terms`)
on nodes pooled by ``fastkd::pool_nodes_forward`` / ``_backward`` (``pool_nodes_cpu.cpp``), which read the input
once, in its own dtype, checking it for NaN and +-Inf in the same pass, where the torch backend's pooling reads it
twice (max pooling, then ``aminmax``). A patch holding NaN or +-Inf makes its node NaN (the torch backend makes
every node NaN): the loss is NaN either way. Max pooling's gradient goes to the first maximal pixel of the
patch, as ``F.max_pool2d``'s. Maps of 1 x 1 patches have nothing to pool: there ``cpp`` is the torch backend.

Imported only where ``fastkd._C`` is loaded.
"""

from __future__ import annotations

import torch

from fastkd.ops import _graph
from fastkd.ops._custom_ops import op_pair
from fastkd.ops.affinity_full import schema, torch_backend

full_graph_terms = schema.register("fastkd")
emulated_full_graph_terms = schema.register("fastkd_emulated")


def _fake_pool_forward(x, kernel_h, kernel_w, max_pool):
    nodes = (x.shape[0], x.shape[1], -(-x.shape[2] // kernel_h), -(-x.shape[3] // kernel_w))
    return x.new_empty(nodes, dtype=torch.float64), x.new_empty(nodes if max_pool else (0,), dtype=torch.int64)


def _fake_pool_backward(grad_nodes, x, winners, kernel_h, kernel_w, max_pool):
    return torch.empty_like(x)


_pool_forward, _pool_backward = op_pair("fastkd", "pool_nodes", _fake_pool_forward, _fake_pool_backward)


def _setup_pool_context(ctx, inputs, output):
    x, kernel_h, kernel_w, max_pool = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1])
    ctx.arguments = (kernel_h, kernel_w, max_pool)


def _pool_backward_fn(ctx, grad_nodes, _winners):
    x, winners = ctx.saved_tensors
    return _pool_backward(grad_nodes, x, winners, *ctx.arguments), None, None, None


torch.library.register_autograd(_pool_forward, _pool_backward_fn, setup_context=_setup_pool_context)


def pool_nodes(x: torch.Tensor, grid: _graph.NodeGrid) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, grid_h, grid_w) float64 nodes, as :func:`fastkd.ops._graph.pool_nodes`."""
    if (grid.kernel_h, grid.kernel_w) == (1, 1):
        return _graph.pool_nodes(x, grid)
    return _pool_forward(x, grid.kernel_h, grid.kernel_w, grid.max_pool)[0]


def cpp_full_graph_terms(s: torch.Tensor, t: torch.Tensor, grid: _graph.NodeGrid, eps: float, detach_norm: bool,
                         use_gram: bool, per_row: bool) -> torch.Tensor:
    """The torch backend's ``full_graph_terms`` on nodes pooled by the compiled CPU op."""
    return torch_backend.full_graph_terms(s, t, grid, eps, detach_norm, use_gram, per_row, pool=pool_nodes)
