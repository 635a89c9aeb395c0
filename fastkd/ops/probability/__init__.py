"""The ``probability`` op: ``||softmax(l_s(x)) - softmax(l_t(x))||_2^2`` per pixel (Xie et al. 2018, sec. 3.1;
FORMULAS.md section 4), (B, H, W) float64. One module per backend, each exposing ``probability_terms(s, t)``:

* ``torch_backend``: float64 ``softmax``, autograd;
* ``triton_backend``: the Triton kernels, custom ops ``fastkd_triton::probability_forward`` / ``_backward``;
* ``extension_backend``: ``fastkd::probability_forward`` / ``_backward`` of ``fastkd._C`` (``csrc/probability/``:
  the CUDA kernels on the CUDA key, the C++ implementation on the CPU key; ``fastkd_emulated::`` runs the
  CUDA kernels on CPU tensors through the emulator);
* ``schema``: what the kernel backends' ops share (:mod:`fastkd.ops._per_pixel_schema`).

The kernels read each pixel's logits in their own dtype and compute its softmaxes in float64 registers; the
backward recomputes them, nothing is saved but the inputs (the passes each takes over the channels are described
in its source). The loss built on the op is :mod:`fastkd.ops.probability_loss`.
"""
