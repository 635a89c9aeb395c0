"""The ``pixelwise_kd`` op: ``KL(softmax(l_t / T) || softmax(l_s / T))`` per pixel (Liu et al. 2020, eq. 1;
Hinton et al.; FORMULAS.md section 5), (B, H, W) float64. One module per backend, each exposing
``pixelwise_kd_terms(s, t, temperature)``:

* ``torch_backend``: float64 ``log_softmax``, autograd;
* ``triton_backend``: the Triton kernels, custom ops ``fastkd_triton::pixelwise_kd_forward`` / ``_backward``;
* ``extension_backend``: ``fastkd::pixelwise_kd_forward`` / ``_backward`` of ``fastkd._C`` (``csrc/pixelwise_kd/``:
  the CUDA kernels on the CUDA key, the C++ implementation on the CPU key; ``fastkd_emulated::`` runs the
  CUDA kernels on CPU tensors through the emulator);
* ``schema``: what the kernel backends' ops share (:mod:`fastkd.ops._per_pixel_schema`).

The kernels read each pixel's logits in their own dtype and compute its softmaxes in float64 registers; the
backward recomputes them, nothing is saved but the inputs (the passes each takes over the channels are described
in its source). The loss built on the op is :mod:`fastkd.ops.pixelwise_kd_loss`.
"""
