"""FLOP and byte counts of the kernels (and of the one-pass per-pixel losses), and the time floor they
imply on a GPU.

``NOTES.md`` beside this file tabulates them for representative shapes (regenerate it with
``python -m fastkd.ops.costs``); benchmarks divide a measured time by :meth:`Cost.floor_seconds`
to report how far a kernel is from its floor.

Counting rules. A FLOP is one float64 add or multiply (a fused multiply-add is 2). ``minimum_bytes`` is the
traffic no implementation can avoid: each input read once, and in backward each gradient written once.
``kernel_bytes`` is what the kernels as written move, counting every input a kernel reads once per launch
(reuse inside a launch is assumed to hit L2) and every float64 buffer they write and read back; where a node
is a patch, the full graph's kernels read float64 maps of the pooled nodes, pooled once a pass. Pooling and
normalisation FLOPs (O(B C H W)) are left out of the affinity counts: they are small next to the
O(B m C^2) products. Notation: ``B`` images, ``Cs``/``Ct`` channels, ``H x W`` pixels, ``m`` nodes,
``e`` bytes per input element, ``h = r (2r + 1) + r + 1`` offsets in half a Chebyshev window of radius r.
"""

from __future__ import annotations

from dataclasses import dataclass

# NVIDIA H100 SXM, the figures issue 3 asks us to hold measurements against: HBM3 bandwidth and the
# non-tensor FP32 rate (67 TFLOP/s; FP64 on tensor cores, which tl.dot on float64 uses, is also 67, while
# FP64 on the CUDA cores, used by the element-wise window and consistency kernels, is 34).
H100_BYTES_PER_SECOND = 3.3e12
H100_FLOPS = 67e12
F64 = 8


@dataclass(frozen=True)
class Cost:
    flops: float
    minimum_bytes: float
    kernel_bytes: float

    def floor_seconds(self, flops_per_second: float = H100_FLOPS,
                      bytes_per_second: float = H100_BYTES_PER_SECOND) -> float:
        """The roofline floor: the larger of the compute time and the unavoidable-traffic time."""
        return max(self.flops / flops_per_second, self.minimum_bytes / bytes_per_second)


@dataclass(frozen=True)
class Shape:
    batch: int
    cs: int
    ct: int
    height: int
    width: int
    nodes: int  # m: H * W without pooling
    element_bytes: int = 4

    def inputs(self) -> float:
        """Bytes of s and t."""
        return self.batch * (self.cs + self.ct) * self.height * self.width * self.element_bytes

    def node_buffers(self) -> float:
        """Bytes of one float64 (B, C, m) buffer for s and one for t (dL/df_hat, or the pooled nodes)."""
        return F64 * self.batch * self.nodes * (self.cs + self.ct)

    @property
    def pooled(self) -> bool:
        """Whether a node is a patch of pixels (patch > 1 or pool_scale) rather than one pixel."""
        return self.nodes < self.height * self.width

    def node_reads(self) -> float:
        """Bytes of one read of the nodes the full graph's dot kernels take: the inputs themselves, or the
        float64 maps of their pooled nodes (``kernel_operands`` pools them once a pass)."""
        return self.node_buffers() if self.pooled else self.inputs()

    def pooling(self) -> float:
        """Bytes of the pass that pools the nodes ahead (the inputs read, the float64 maps written), or 0."""
        return self.inputs() + self.node_buffers() if self.pooled else 0.0


def _node_backward_bytes(x: Shape) -> float:
    """The backward's last step: dL/df_hat written and read once (the float64 buffers; the norm's share of each
    node's gradient, f_hat . dL/df_hat, is summed by the kernels that make dL/df_hat, from tiles they reread), f
    read for the normalisation's backward, and dL/dx written. (A max pool's backward also reads the inputs to
    find each patch's winner: not counted, the examples average.)"""
    return 2 * x.node_buffers() + x.node_reads() + x.inputs()


def gram_full_graph(x: Shape, per_row: bool) -> dict:
    """Gram path: norms, SS' ST' TT' (and the row forms for ``per_row``, the distillation loss); backward
    with uniform (pair-wise) or per-row (distillation) weights, then ``node_backward``."""
    b, m, cs, ct = x.batch, x.nodes, x.cs, x.ct
    grams = 2 * b * m * (cs * cs + cs * ct + ct * ct)
    apply = 2 * b * m * (cs + ct) ** 2  # dL/ds_hat and dL/dt_hat: (Cs x (Cs + Ct)) and (Ct x (Ct + Cs)) per node
    forms = 2 * b * m * (cs * cs + cs * ct + ct * ct) if per_row else 0
    forward = Cost(flops=grams + forms, minimum_bytes=x.inputs(),  # norms 1x, Gram 2x, forms 2x
                   kernel_bytes=x.pooling() + (3 + (2 if per_row else 0)) * x.node_reads())
    weighted = grams if per_row else 0  # S W S', S W T', T W T'
    backward = Cost(flops=weighted + apply * (2 if per_row else 1), minimum_bytes=2 * x.inputs(),
                    kernel_bytes=x.pooling() + ((2 if per_row else 0) + 2) * x.node_reads()  # weighted Grams, apply
                    + _node_backward_bytes(x))
    return {"forward": forward, "backward": backward}


def direct_full_graph(x: Shape) -> dict:
    """Direct path: tiles of D = S'S - T'T formed in registers forward (with few nodes, m <= 64, D itself, a
    (B, m, m) partial per range of channels: for the pool_scale example 0.2 MB beside 138 MB of inputs, left
    out). The backward forms ``W = 2 (w_i + w_j) D`` a slab of rows at a time, writes it (B m^2 doubles in all)
    and reads it once per input."""
    b, m, cs, ct = x.batch, x.nodes, x.cs, x.ct
    tiles = 2 * b * m * m * (cs + ct) + 3 * b * m * m  # the two affinity products, then D^2 and its sum
    forward = Cost(flops=tiles, minimum_bytes=x.inputs(), kernel_bytes=x.pooling() + 2 * x.node_reads())  # norms, D
    weights = 3 * F64 * b * m * m
    backward = Cost(flops=tiles + 2 * b * m * m * (cs + ct), minimum_bytes=2 * x.inputs(),
                    kernel_bytes=x.pooling() + x.node_reads() + weights + _node_backward_bytes(x))  # W formed, applied
    return {"forward": forward, "backward": backward}


def window_graph(x: Shape, radius: int, tiled: bool = False) -> dict:
    """Windowed graph: half-window affinities (D and a_t stored) forward; full-window gather backward (dL/df_hat
    and each node's ``f_hat . dL/df_hat`` for the norm's share), then ``node_backward`` (CUDA's per-node kernels,
    which serve reaches above 2, take a separate pass for the norm's share: one more read of dL/df_hat and x).
    ``tiled``: the CUDA kernels of reach 1 and 2 (csrc/affinity_window/affinity_window.cu), whose forward finds the
    norms in its own pass over each input (no norm pass ahead) and keeps a_s in the D buffer while t's dots are
    summed (it writes, reads and rewrites D, and writes a_t), and whose backward is one pass per input: x read, D
    and a_t read, the gradient written (no dL/df_hat buffer, no second and third read of x). Their halo re-reads,
    and the D and a_t re-reads of a backward's channel groups, are reuse inside a launch."""
    b, m, channels = x.batch, x.nodes, x.cs + x.ct
    half = radius * (2 * radius + 1) + radius + 1
    full = (2 * radius + 1) ** 2
    stored = F64 * b * m * half  # one (B, half, m) float64 map: D or a_t
    forward = Cost(flops=2 * b * m * half * channels + 3 * b * m * half, minimum_bytes=x.inputs(),
                   kernel_bytes=x.inputs() + 4 * stored if tiled else 2 * x.inputs() + 2 * stored)
    backward = Cost(flops=2 * b * m * full * channels, minimum_bytes=2 * x.inputs(),
                    kernel_bytes=2 * x.inputs() + 4 * stored if tiled
                    else 3 * x.inputs() + 2 * stored + 2 * x.node_buffers())
    return {"forward": forward, "backward": backward}


def consistency(x: Shape) -> dict:
    """8-neighbour map from both ends of every edge (no atomics): 8 differences, squares and adds per
    channel and pixel forward; backward 8 (g + g') (l - l') terms per channel and pixel."""
    b, pixels, channels = x.batch, x.height * x.width, x.cs + x.ct
    diff_map = F64 * b * pixels
    forward = Cost(flops=24 * b * pixels * channels, minimum_bytes=x.inputs(), kernel_bytes=x.inputs() + diff_map)
    backward = Cost(flops=32 * b * pixels * channels, minimum_bytes=2 * x.inputs(),
                    kernel_bytes=2 * x.inputs() + 2 * diff_map)  # map read per input
    return {"forward": forward, "backward": backward}


def _softmax_pair(x: Shape, forward_per_element: int, backward_per_element: int) -> dict:
    """A per-pixel loss of two softmaxes over the (same) channels, in one pass forward and one backward: the
    FLOPs per (b, pixel, channel); each input read once, and in backward read again and each gradient
    written once."""
    if x.cs != x.ct:
        raise ValueError(f"the per-pixel losses compare the same classes, got Cs={x.cs} and Ct={x.ct}")
    elements = x.batch * x.height * x.width * x.cs
    forward = Cost(flops=forward_per_element * elements, minimum_bytes=x.inputs(), kernel_bytes=x.inputs())
    backward = Cost(flops=backward_per_element * elements, minimum_bytes=2 * x.inputs(),
                    kernel_bytes=2 * x.inputs())
    return {"forward": forward, "backward": backward}


def pixelwise_kd(x: Shape) -> dict:
    """``T^2 KL(q_t || q_s)`` per pixel. Forward, per channel and pixel: for each input the 1/T scale, the
    max, the shift, exp and the sum (5 each; exp and log count as one FLOP, the loss is memory bound by an
    order of magnitude either way), then log q_t - log q_s, the product with q_t and the sum (5).
    Backward: both softmaxes again (10), ``T (q_s - q_t)`` times the incoming gradient (2)."""
    return _softmax_pair(x, forward_per_element=15, backward_per_element=12)


def probability(x: Shape) -> dict:
    """``||softmax(l_s) - softmax(l_t)||^2`` per pixel. Forward, per channel and pixel: both softmaxes
    (4 each: max, shift, exp, sum), the difference, its square and the sum (3). Backward: both softmaxes
    again (8), ``d = 2 (p_s - p_t) g`` (2), then through the softmax ``p_s (d - sum_c p_s d)`` (4)."""
    return _softmax_pair(x, forward_per_element=11, backward_per_element=14)


# Representative shapes: (description, cost function, its arguments).
EXAMPLES = [
    ("PairwiseAffinityLoss() Gram, B=8, C=256+256, 128x128 (m=16384)",
     gram_full_graph, (Shape(8, 256, 256, 128, 128, 16384), False)),
    ("PairwiseAffinityLoss() Gram, B=8, C=512+128, 256x512 (m=131072)",
     gram_full_graph, (Shape(8, 512, 128, 256, 512, 131072), False)),
    ("PairwiseAffinityLoss(pool_scale=0.5) direct, B=8, C=512+512, 65x65 (m=9)",
     direct_full_graph, (Shape(8, 512, 512, 65, 65, 9),)),
    ("PairwiseAffinityLoss() direct, B=8, C=512+512, 24x24 (m=576)",
     direct_full_graph, (Shape(8, 512, 512, 24, 24, 576),)),
    ("AffinityDistillationLoss() Gram, B=8, C=256+256, 64x64 (m=4096)",
     gram_full_graph, (Shape(8, 256, 256, 64, 64, 4096), True)),
    ("PairwiseAffinityLoss(patch=2, window=2), B=8, C=256+256, 128x256 (m=8192)",
     window_graph, (Shape(8, 256, 256, 128, 256, 8192), 2)),
    ("PairwiseAffinityLoss(patch=2, window=2) CUDA tiles, B=8, C=256+256, 128x256 (m=8192)",
     window_graph, (Shape(8, 256, 256, 128, 256, 8192), 2, True)),
    ("ConsistencyLoss(), B=8, C=19+19, 512x1024",
     consistency, (Shape(8, 19, 19, 512, 1024, 512 * 1024),)),
    ("PixelwiseKDLoss(), B=8, C=19+19, 512x1024",
     pixelwise_kd, (Shape(8, 19, 19, 512, 1024, 512 * 1024),)),
    ("ProbabilityLoss(), B=8, C=19+19, 512x1024",
     probability, (Shape(8, 19, 19, 512, 1024, 512 * 1024),)),
]


def table() -> str:
    """The markdown table of NOTES.md."""
    lines = ["| shape (float32 inputs) | pass | GFLOP | minimum MB | kernel MB | H100 floor | bound by |",
             "|---|---|---:|---:|---:|---:|---|"]
    for description, function, arguments in EXAMPLES:
        for name, cost in function(*arguments).items():
            compute = cost.flops / H100_FLOPS
            memory = cost.minimum_bytes / H100_BYTES_PER_SECOND
            lines.append(f"| {description} | {name} | {cost.flops / 1e9:,.2f} | {cost.minimum_bytes / 1e6:,.1f} "
                         f"| {cost.kernel_bytes / 1e6:,.1f} | {cost.floor_seconds() * 1e6:,.0f} us "
                         f"| {'compute' if compute >= memory else 'memory'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
