"""The ``consistency`` op: the 8-neighbour map loss of Xie et al. 2018, sec. 3.1 (FORMULAS.md section 3).

``consistency_sum(s, t, valid, dilation) = sum_{b, x defined} (c_s(x) - c_t(x))^2`` (float64, differentiable),
with ``c(x) = sum_{o in N8, x + o inside} ||l(x + o) - l(x)||^2`` and ``N8 = {-d, 0, d}^2 \\ {(0, 0)}``;
``valid`` defines c only where all 8 neighbours lie inside. One module per backend, each exposing
``consistency_sum``:

* ``torch_backend``: strided views per edge, an autograd Function;
* ``triton_backend``: the Triton kernels, custom ops ``fastkd_triton::consistency_forward`` / ``_backward``;
* ``extension_backend``: ``fastkd::consistency_forward`` / ``_backward`` of ``fastkd._C`` (``csrc/consistency/``:
  CUDA kernels on the CUDA key, the C++ implementation on the CPU key) and ``fastkd_emulated::...``;
* ``schema``: what the kernel backends' ops share: their schema, fake implementations and autograd.

The loss built on it is :mod:`fastkd.ops.consistency_loss`.
"""
