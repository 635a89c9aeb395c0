"""The ops and the losses built on them. Imports run one way, down this list:

* leaves: :mod:`._common` (compute dtype, empty inputs, non-finite results), :mod:`._graph` (the node and
  graph math every affinity backend shares), :mod:`._triton_launch` and :mod:`._triton_nodes` (what the Triton
  backends share), :mod:`.costs` (FLOP and byte counts); with :mod:`fastkd._extension` (loads ``fastkd._C``)
  and :mod:`fastkd._triton` (the Triton probe) outside this package;
* one package per op, ``affinity_full/``, ``affinity_window/``, ``consistency/``, ``pixelwise_kd/``,
  ``probability/``: a module per backend (``torch_backend``, ``triton_backend``, ``extension_backend`` for the
  compiled ``cuda`` and ``cpp`` ops) and the ``schema`` their custom ops share; they import only leaves,
  torch, triton and ``torch.ops``;
* the registry, :mod:`fastkd._backends`, which names every op's implementations and imports them when they
  first run;
* one module per loss, named after its function (``pairwise_affinity_loss``, ``affinity_distillation_loss``,
  ``consistency_loss``, ``probability_loss``, ``pixelwise_kd_loss``): configuration checks, the op(s) it
  runs through the registry, the reduction;
* :mod:`fastkd.losses` (the ``nn.Module``s) and :mod:`fastkd.functional`.

The package ``__init__`` files import nothing, so importing one backend module runs only its own imports.
"""
