"""The ``probability`` op: ``||softmax(l_s(x)) - softmax(l_t(x))||_2^2`` per pixel (Xie et al. 2018, sec. 3.1;
FORMULAS.md section 4). Only a ``torch_backend`` (a softmax and a sum: no fused kernel is planned); the loss
built on it is :mod:`fastkd.ops.probability_loss`.
"""
