"""The ``torch`` backend of the ``affinity_full`` op.

Gram path (:class:`GramTerms`, an autograd Function): ``sum_ij (a_s_ij - a_t_ij)^2 = ||S S'||^2 - 2 ||S T'||^2
+ ||T T'||^2`` per image and, per row, ``r_i = s_i' (S S') s_i - 2 s_i' (S T') t_i + t_i' (T T') t_i``, with
S (Cs x m), T (Ct x m) the normalised nodes, so only C x C Gram matrices exist. The terms nearly cancel when
student and teacher agree, so everything is in float64, yet no float64 copy of an input is made: the nodes are
read in chunks (:func:`chunks`, at most about ``CHUNK_ELEMENTS`` float64 values: the student's and the
teacher's channels of the same nodes, U = [S; T]), each widened to float64 in a reused buffer, normalised
and added to the Grams ``[S S' | S T']`` and ``T T'``, chunk after chunk in a fixed order (no atomics: bitwise
reproducible). The per-row terms take a second pass, once the Grams are complete.

Backward saves only the nodes, their norms (B, m), the Grams and which terms were kept, and recomputes each
chunk (widened and divided by the saved norms in one call per input: bitwise the forward's U). With the signed
Gram ``G = [[S S', -S T'], [-T S', T T']]`` and ``w`` the incoming gradient, ``dL/dU = 4 w G U`` for the image
sum and ``dL/dU_i = 2 (w_i (G U)_i + (P U)_i)`` per row, ``P`` the same signed blocks of ``U diag(w) U'`` (one
more pass); then through the normalisation ``f_hat = f / (n + eps)``:
``df = g / (n + eps) - f_hat (f_hat . g) / n`` (only the first term with ``detach_norm``), written in the
nodes' dtype chunk by chunk. Student and teacher rows of G are used only for the inputs that need a gradient.

The nodes: for a 1 x 1 patch the input's pixels, in its dtype (a NaN or Inf there makes its normalised node
NaN, and every Gram entry it touches: the terms are NaN); pooled nodes come from
:func:`fastkd.ops._graph.pool_nodes` (float64, a patch times smaller; the cpp backend passes its compiled pooling
as ``pool``), and autograd differentiates the pooling.

Direct path (when m is small next to C): the m x m difference of the float64 nodes materialised, differentiated
by autograd.

Under ``torch.compile`` the chunk loops unroll, at most ``MAX_CHUNKS`` chunks a pass (one chunk for maps of up
to about ``CHUNK_ELEMENTS / (B (Cs + Ct))`` nodes).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from fastkd.ops._common import COMPUTE_DTYPE
from fastkd.ops._graph import NodeGrid, Pool, graph_nodes, pool_nodes

# The Gram path walks U = [S; T] in chunks of CHUNK_ELEMENTS float64 values (2 MiB: a chunk and its two or
# three scratch buffers stay in cache between the widening, the normalisation and the GEMMs), or of 1 / MAX_CHUNKS
# of U where that is more. Each chunk costs some twenty parallel ATen calls a pass, and when another process
# holds one of the 2 cores each call waits for its descheduled OpenMP thread (~7 ms): measured at B=2,
# C=64+64, 256x512 on the shared 2-core CPU, 8 chunks a pass ran 2.9x the GEMM floor there against 4.4x for
# 16 and 8x for 32, and single-threaded 1.9x against 1.7x and 1.5x. MAX_CHUNKS also bounds the loops
# torch.compile unrolls. A chunk has at least MIN_CHUNK_NODES nodes: below that the per-call overhead of its
# GEMMs outweighs their work.
CHUNK_ELEMENTS = 1 << 18
MAX_CHUNKS = 8
MIN_CHUNK_NODES = 256

Chunk = Tuple[slice, slice]  # (images, nodes)


# --------------------------------------------------------------------------------------------- direct path

def affinity_difference(s_hat: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """``a_s - a_t`` materialised, (B, m, m): the direct evaluation, for when m is small next to C."""
    return torch.bmm(s_hat.transpose(1, 2), s_hat) - torch.bmm(t_hat.transpose(1, 2), t_hat)


def direct_terms(s_hat: torch.Tensor, t_hat: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``sum_j (a_s_ij - a_t_ij)^2`` per row (B, m), or its sum per image (B,), from normalised nodes (B, C, m)."""
    squares = affinity_difference(s_hat, t_hat).square()
    return squares.sum(dim=2) if per_row else squares.sum((1, 2))


# ----------------------------------------------------------------------------------------------- Gram path

def chunks(batch: int, channels: int, nodes: int) -> List[Chunk]:
    """The (images, nodes) slices the Gram path walks, in this fixed order (it depends only on the shapes): all
    images at once and as many nodes as keep an ``images x channels x nodes`` chunk within ``CHUNK_ELEMENTS``
    or ``1 / MAX_CHUNKS`` of the whole, whichever is more, but at least ``MIN_CHUNK_NODES`` nodes (then fewer
    images at a time)."""
    budget = max(CHUNK_ELEMENTS, -(-batch * channels * nodes // MAX_CHUNKS))
    width = max(1, min(nodes, max(MIN_CHUNK_NODES, budget // max(batch * channels, 1))))
    images = max(1, min(batch, budget // (channels * width)))
    return [(slice(b, min(b + images, batch)), slice(i, min(i + width, nodes)))
            for b in range(0, batch, images) for i in range(0, nodes, width)]


def workspace(s: torch.Tensor, t: torch.Tensor, plan: List[Chunk], count: int) -> List[torch.Tensor]:
    """``count`` flat float64 buffers as large as the largest chunk of U (the first), reused chunk after chunk
    (:func:`shaped`): a pass allocates no chunk-sized tensor per chunk, so it does not page-fault per chunk."""
    images, nodes = plan[0]
    size = (images.stop - images.start) * (s.shape[1] + t.shape[1]) * (nodes.stop - nodes.start)
    return [torch.empty(size, dtype=COMPUTE_DTYPE, device=s.device) for _ in range(count)]


def shaped(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The start of a flat ``buffer`` as a contiguous tensor of ``shape``."""
    return buffer[:math.prod(shape)].view(shape)


def first_load(s: torch.Tensor, t: torch.Tensor, chunk: Chunk, eps: float, space: List[torch.Tensor]):
    """``U = [S; T]`` of one chunk, (g, Cs + Ct, k) float64 normalised nodes in ``space[0]`` (``space[1]`` is
    scratch), and the norms ``||f||`` of its student and teacher nodes, (g, 1, k) each."""
    images, nodes = chunk
    first = s[images, :, nodes]
    u = shaped(space[0], first.shape[0], s.shape[1] + t.shape[1], first.shape[2])
    parts = (slice(0, s.shape[1]), slice(s.shape[1], None))
    for part, x in zip(parts, (first, t[images, :, nodes])):
        u[:, part].copy_(x)
    squares = torch.mul(u, u, out=shaped(space[1], *u.shape))  # (vector_norm reduces dim 1 several times slower)
    norms = [squares[:, part].sum(dim=1, keepdim=True).sqrt_() for part in parts]
    for part, norm in zip(parts, norms):
        u[:, part].div_(norm + eps)
    return u, norms


def load(s: torch.Tensor, t: torch.Tensor, chunk: Chunk, norms: Tuple[torch.Tensor, torch.Tensor], eps: float,
         space: List[torch.Tensor]):
    """U of one chunk again, in ``space[0]``, from the norms (B, 1, m) of the first pass (bitwise the U of
    :func:`first_load`), and the chunk's norms, (g, 1, k) each. (``torch.div(x, n, out=u[:, part])`` would
    save a pass, but Dynamo refuses a non-contiguous ``out=``.)"""
    images, nodes = chunk
    first = s[images, :, nodes]
    u = shaped(space[0], first.shape[0], s.shape[1] + t.shape[1], first.shape[2])
    parts = (slice(0, s.shape[1]), slice(s.shape[1], None))
    chunk_norms = [norm[images, :, nodes] for norm in norms]
    for part, x, norm in zip(parts, (first, t[images, :, nodes]), chunk_norms):
        u[:, part].copy_(x).div_(norm + eps)
    return u, chunk_norms


def drop_rounding_noise(form_ss: torch.Tensor, form_st: torch.Tensor, form_tt: torch.Tensor):
    """``r_i = form_ss - 2 form_st + form_tt`` and where it is kept. Values within a few ulps of the Gram
    terms are rounding noise and are set to exactly 0 (not kept: no gradient), so identical rows give a zero
    loss and a zero (not an enormous) gradient; NaN stays NaN."""
    squares = form_ss - 2 * form_st + form_tt
    noise = 64 * torch.finfo(COMPUTE_DTYPE).eps * (form_ss + form_tt)
    dropped = squares <= noise
    return torch.where(dropped, torch.zeros_like(squares), squares), ~dropped


def row_terms(s: torch.Tensor, t: torch.Tensor, norms, gram_su: torch.Tensor, gram_tt: torch.Tensor,
              plan: List[Chunk], eps: float):
    """``r_i`` (B, m) and where it is kept (B, m), from the complete Grams: a second pass over the chunks."""
    cs = s.shape[1]
    terms = gram_su.new_empty(s.shape[0], s.shape[2])
    kept = torch.empty(terms.shape, dtype=torch.bool, device=terms.device)
    left = gram_su.transpose(1, 2)  # [S S'; T S']
    space = workspace(s, t, plan, 2)
    for chunk in plan:
        images, nodes = chunk
        u, _ = load(s, t, chunk, norms, eps, space)
        s_hat, t_hat = u[:, :cs], u[:, cs:]
        forms = torch.bmm(left[images], s_hat, out=shaped(space[1], *u.shape))
        form_ss = forms[:, :cs].mul_(s_hat).sum(dim=1)  # s_i' (S S') s_i
        form_st = forms[:, cs:].mul_(t_hat).sum(dim=1)  # t_i' (T S') s_i = s_i' (S T') t_i
        forms = torch.bmm(gram_tt[images], t_hat, out=shaped(space[1], *t_hat.shape))
        form_tt = forms.mul_(t_hat).sum(dim=1)  # t_i' (T T') t_i
        terms[images, nodes], kept[images, nodes] = drop_rounding_noise(form_ss, form_st, form_tt)
    return terms, kept


def signed_gram(gram_su: torch.Tensor, gram_tt: torch.Tensor) -> torch.Tensor:
    """``[[S S', -S T'], [-T S', T T']]`` (B, Cs + Ct, Cs + Ct) from ``[S S' | S T']`` and ``T T'``."""
    cs = gram_su.shape[1]
    lower = torch.cat([-gram_su[:, :, cs:].transpose(1, 2), gram_tt], dim=2)
    return torch.cat([torch.cat([gram_su[:, :, :cs], -gram_su[:, :, cs:]], dim=2), lower], dim=1)


def weighted_gram(s: torch.Tensor, t: torch.Tensor, norms, weights: torch.Tensor, rows: slice, plan: List[Chunk],
                  eps: float) -> torch.Tensor:
    """The ``rows`` of the signed blocks of ``U diag(w) U'`` (B, rows, Cs + Ct), ``w`` (B, m) per node."""
    cs, total = s.shape[1], s.shape[1] + t.shape[1]
    weighted = torch.zeros(s.shape[0], rows.stop - rows.start, total, dtype=COMPUTE_DTYPE, device=s.device)
    space = workspace(s, t, plan, 2)
    for chunk in plan:
        images, nodes = chunk
        u, _ = load(s, t, chunk, norms, eps, space)
        scaled = torch.mul(u[:, rows], weights[images, None, nodes], out=shaped(space[1], *u[:, rows].shape))
        weighted[images].baddbmm_(scaled, u.transpose(1, 2))
    sign = torch.ones(total, dtype=COMPUTE_DTYPE, device=s.device)
    sign[cs:] = -1
    return weighted * sign[rows, None] * sign


def normalize_backward(grad_hat: torch.Tensor, f_hat: torch.Tensor, norm: torch.Tensor, eps: float,
                       detach_norm: bool, scratch: torch.Tensor) -> torch.Tensor:
    """``dL/df`` from ``g = dL/df_hat`` for ``f_hat = f / (n + eps)``, channels along dim 1:
    ``g / (n + eps) - f_hat (f_hat . g) / n``, the second term 0 where n = 0 (as autograd's norm backward)
    and dropped with ``detach_norm``. Overwrites ``grad_hat``; ``scratch`` is a flat buffer as large."""
    if detach_norm:
        return grad_hat.div_(norm + eps)
    along = torch.mul(f_hat, grad_hat, out=shaped(scratch, *grad_hat.shape)).sum(dim=1, keepdim=True)
    return grad_hat.div_(norm + eps).addcmul_(f_hat, torch.where(norm > 0, along / norm, 0.0), value=-1)


class GramTerms(torch.autograd.Function):
    """The Gram path on nodes (B, C, m) of any floating dtype: ``r_i`` (B, m) with ``per_row``, else
    ``sum_i r_i`` (B,), float64. Saves the nodes, the Grams, the nodes' norms (B, m) and where the terms are
    kept: nothing of the nodes' size in float64."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, eps: float, detach_norm: bool, per_row: bool):
        batch, cs, m = s.shape
        ct = t.shape[1]
        plan = chunks(batch, cs + ct, m)
        gram_su = torch.zeros(batch, cs, cs + ct, dtype=COMPUTE_DTYPE, device=s.device)  # [S S' | S T']
        gram_tt = torch.zeros(batch, ct, ct, dtype=COMPUTE_DTYPE, device=s.device)
        norms = tuple(torch.empty(batch, 1, m, dtype=COMPUTE_DTYPE, device=s.device) for _ in range(2))
        space = workspace(s, t, plan, 2)
        for chunk in plan:
            images, nodes = chunk
            u, chunk_norms = first_load(s, t, chunk, eps, space)
            for norm, chunk_norm in zip(norms, chunk_norms):
                norm[images, :, nodes] = chunk_norm
            gram_su[images].baddbmm_(u[:, :cs], u.transpose(1, 2))
            gram_tt[images].baddbmm_(u[:, cs:], u[:, cs:].transpose(1, 2))
        if per_row:
            terms, kept = row_terms(s, t, norms, gram_su, gram_tt, plan, eps)
        else:
            terms = (gram_su[:, :, :cs].square().sum((1, 2)) - 2 * gram_su[:, :, cs:].square().sum((1, 2))
                     + gram_tt.square().sum((1, 2)))
            kept = terms >= 0  # a sum of squares; rounding may leave -1e-17 when s == t: clamped, no gradient
            terms = terms.clamp_min(0)
        ctx.save_for_backward(s, t, *norms, gram_su, gram_tt, kept)
        ctx.eps, ctx.detach_norm, ctx.per_row = eps, detach_norm, per_row
        return terms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_terms: torch.Tensor):
        s, t, norm_s, norm_t, gram_su, gram_tt, kept = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_s or need_t):
            return None, None, None, None, None
        batch, cs, m = s.shape
        ct = t.shape[1]
        plan = chunks(batch, cs + ct, m)
        norms = (norm_s, norm_t)
        rows = slice(0 if need_s else cs, cs + ct if need_t else cs)  # the channels of U to differentiate
        weights = torch.where(kept, grad_terms.to(COMPUTE_DTYPE), 0.0)
        left = signed_gram(gram_su, gram_tt)[:, rows]
        right: Optional[torch.Tensor] = None
        if ctx.per_row:  # dL/dU_i = 2 (w_i (G U)_i + (P U)_i)
            left = 2 * left
            right = 2 * weighted_gram(s, t, norms, weights, rows, plan, ctx.eps)
        else:  # dL/dU = 4 w G U
            left = 4 * weights[:, None, None] * left
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) if need else None
                 for x, need in ((s, need_s), (t, need_t))]
        parts = (slice(0, cs), slice(cs, cs + ct))
        space = workspace(s, t, plan, 3)
        for chunk in plan:
            images, nodes = chunk
            u, chunk_norms = load(s, t, chunk, norms, ctx.eps, space)
            grad_u = torch.bmm(left[images], u, out=shaped(space[1], u.shape[0], left.shape[1], u.shape[2]))
            if right is not None:
                grad_u.mul_(weights[images, None, nodes]).baddbmm_(right[images], u)
            for grad, part, norm in zip(grads, parts, chunk_norms):
                if grad is not None:
                    grad_hat = grad_u[:, part.start - rows.start:part.stop - rows.start]
                    grad[images, :, nodes] = normalize_backward(grad_hat, u[:, part], norm, ctx.eps,
                                                                ctx.detach_norm, space[2])
        return grads[0], grads[1], None, None, None


def gram_nodes(x: torch.Tensor, grid: NodeGrid, pool: Pool) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, m) nodes, not normalised: the pixels in the input's dtype for a 1 x 1 patch,
    else the float64 pooled nodes."""
    if (grid.kernel_h, grid.kernel_w) == (1, 1):
        return x.flatten(2)
    return pool(x, grid).flatten(2)


def full_graph_terms(s: torch.Tensor, t: torch.Tensor, grid: NodeGrid, eps: float, detach_norm: bool,
                     use_gram: bool, per_row: bool, *, pool: Pool = pool_nodes) -> torch.Tensor:
    """``r_i`` (B, m) with ``per_row``, else ``sum_i r_i`` (B,), float64; the nodes pooled by ``pool`` (the cpp
    backend passes its compiled pooling)."""
    if use_gram:
        return GramTerms.apply(gram_nodes(s, grid, pool), gram_nodes(t, grid, pool), eps, detach_norm, per_row)
    s_hat = graph_nodes(s, grid, eps, detach_norm, pool).flatten(2)
    t_hat = graph_nodes(t, grid, eps, detach_norm, pool).flatten(2)
    return direct_terms(s_hat, t_hat, per_row)
