"""One module per op: its configuration checks, its torch implementation, its backend table and its public
function. Triton and CUDA implementations register themselves in the ops' ``IMPLEMENTATIONS`` tables."""
