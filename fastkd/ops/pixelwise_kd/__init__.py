"""The ``pixelwise_kd`` op: ``KL(softmax(l_t / T) || softmax(l_s / T))`` per pixel (Liu et al. 2020, eq. 1;
Hinton et al.; FORMULAS.md section 5). Only a ``torch_backend`` (a softmax and a sum: no fused kernel is
planned); the loss built on it is :mod:`fastkd.ops.pixelwise_kd_loss`.
"""
