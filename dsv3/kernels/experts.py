"""Replaces `moe.routed_experts` (one expert at a time, on the tokens that chose it) with a sorted dispatch: the
(token, slot) pairs are sorted by expert so that each expert's rows are contiguous, and one `grouped_mm` per
weight runs every expert at once; no per-expert boolean mask, no Python loop in training.

The variants (which one a call takes: `kernels.moe_routed_experts`, kernels/__init__.py):
  `_padded_grouped_swiglu`  each expert's rows padded to a multiple of CPU_BF16_ROWS, so oneDNN sees repeating
                            shapes and reuses its compiled kernels
  `_grouped_swiglu`         one grouped_mm per weight (also under torch.compile: one graph for every block)
  `_kept_grad_swiglu`       `KeptGradSwiGLU`: grouped_mm with the backward written out, the weight gradients in
                            kept buffers (buffers.workspace) instead of fresh ones
  `_looped_swiglu`          one matmul per expert that received rows (decoding touches k of N)
  `gathered`                compiled decoding: each of a few rows reads its k experts by index (static shapes)
The gate multiplies each row's hidden activation before w2 (the same product as scaling the output, w2 being
linear, and a third of the work).
tests/kernels/test_experts.py checks values and gradients against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .buffers import KeptGradCast, workspace

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
GATHER_ROWS = 64  # compiled inference on at most this many rows reads the experts by index (`gathered`)


def sorted_dispatch(experts, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, dt: torch.dtype, swiglu):
    """x (tokens, dim); indices, gates (tokens, k) -> (tokens, dim), the experts computing in dt by `swiglu`, one of
    the variants below: it takes the expert-sorted rows (`_padded_grouped_swiglu`: x and each sorted row's token)."""
    k, flat = indices.shape[1], indices.reshape(-1)
    load = flat.new_zeros(experts.w1.shape[0]).scatter_add_(0, flat, torch.ones_like(flat))  # rows per expert
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token = order // k
    w1, w2, w3 = experts.w1, experts.w2, experts.w3
    if dt != w1.dtype:  # grouped_mm is not on autocast's list; the CPU trains with kept weight gradients
        kept = x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        cast = KeptGradCast.apply if kept else (lambda w, d: w.to(d))
        w1, w2, w3 = cast(w1, dt), cast(w2, dt), cast(w3, dt)
    g = gates.reshape(-1)[order].unsqueeze(-1).to(dt)  # each sorted pair's gate g_i,t
    if swiglu is _padded_grouped_swiglu:
        ys = swiglu(x.to(dt), token, w1, w2, w3, load, g)
    else:  # backward of index_select: index_add_, faster on CPU than x[token]'s index_put
        ys = swiglu(x.index_select(0, token).to(dt), w1, w2, w3, load, g)
    return torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)


def _grouped_swiglu(xs, w1, w2, w3, load, g):
    """Every expert's SwiGLU on its contiguous slice of the expert-sorted rows, times each row's gate g (rows, 1):
    one grouped_mm per weight. The gate scales the inter-wide hidden row before w2 (the same product, since w2 is
    linear), a third of the work of scaling the dim-wide output, forward and backward."""
    offs = load.cumsum(0).to(torch.int32)
    h = F.silu(F.grouped_mm(xs, w1, offs=offs)) * F.grouped_mm(xs, w3, offs=offs) * g
    return F.grouped_mm(h, w2, offs=offs)


class KeptGradSwiGLU(torch.autograd.Function):
    """`_grouped_swiglu` in fp32 on the CPU, with the backward written out so that the experts' weight gradients
    land in buffers kept from step to step (`buffers.workspace`, reused only when nothing holds them) instead of
    the three fresh (experts, dim, inter) tensors grouped_mm's own backward allocates per layer. Same products."""

    @staticmethod
    def forward(ctx, xs, w1, w2, w3, g, offs):
        a1, a3 = F.grouped_mm(xs, w1, offs=offs), F.grouped_mm(xs, w3, offs=offs)
        s1 = F.silu(a1)
        ctx.save_for_backward(xs, w1, w2, w3, g, offs, a1, a3)
        return F.grouped_mm(s1 * a3 * g, w2, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w2, w3, g, offs, a1, a3 = ctx.saved_tensors
        s1 = F.silu(a1)
        dh = F.grouped_mm(dy, w2.transpose(1, 2), offs=offs)  # d(hidden row), hidden = silu(a1) * a3 * g
        dhg = dh * g
        da3 = dhg * s1
        da1 = torch.ops.aten.silu_backward(dhg * a3, a1)  # silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
        dg = (dh * (s1 * a3)).sum(-1, keepdim=True)
        dxs = F.grouped_mm(da1, w1.transpose(1, 2), offs=offs)
        dxs.add_(F.grouped_mm(da3, w3.transpose(1, 2), offs=offs))  # in place: no third fresh (rows, dim) tensor
        h = s1 * a3 * g
        bounds = [0] + offs.tolist()
        grads = []
        for i, (w, a, b) in enumerate(((w1, xs, da1), (w2, h, dy), (w3, xs, da3))):  # dW[e] = a_e^T @ b_e
            if not ctx.needs_input_grad[1 + i]:
                grads.append(None)
                continue
            dw = workspace(w, "dw", w.shape, w.dtype, w.device).view(w.shape)
            for e in range(w.shape[0]):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    torch.mm(a[lo:hi].t(), b[lo:hi], out=dw[e])
                else:
                    dw[e].zero_()
            grads.append(dw)
        return dxs, grads[0], grads[1], grads[2], dg, None


@torch.compiler.disable  # fp32 under torch.compile: a graph break (torch's CPU grouped_mm check asks for bf16)
def _kept_grad_swiglu(xs, w1, w2, w3, load, g):
    return KeptGradSwiGLU.apply(xs, w1, w2, w3, g, load.cumsum(0).to(torch.int32))

CPU_BF16_ROWS = 16  # on CPU, bf16 expert groups are padded to a multiple of this many rows (see below)


@torch.compiler.disable
def _padded_grouped_swiglu(x, token, w1, w2, w3, load, g):
    """`_grouped_swiglu` for bf16 on CPU, each expert's rows padded with zero rows to a multiple of CPU_BF16_ROWS.

    oneDNN builds (JIT-compiles) a bf16 matmul kernel for every new shape. The rows per expert change every
    step, so each step compiled hundreds of kernels; with counts rounded up to a multiple of 16 the shapes
    repeat and the kernels come from oneDNN's cache after warm-up.
    x (tokens, dim); token: the source row of each expert-sorted (token, slot) pair -> their outputs, in order."""
    m = CPU_BF16_ROWS
    counts = load.long()
    padded = (counts + m - 1) // m * m
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # how far each expert's block moves
    dest = torch.arange(token.numel(), device=x.device) + shift.repeat_interleave(counts)  # real rows, padded layout
    src = torch.full((int(padded.sum()),), x.shape[0], dtype=torch.long, device=x.device)
    src[dest] = token  # padding rows read the zero row appended below
    xs = F.pad(x, (0, 0, 0, 1)).index_select(0, src)
    g_pad = g.new_zeros(src.shape[0], 1).index_copy(0, dest, g)  # padding rows: gate 0 (their rows are 0 anyway)
    return _grouped_swiglu(xs, w1, w2, w3, padded, g_pad).index_select(0, dest)


@torch.compiler.disable  # under torch.compile, the counts would become guards: a recompile per new load
def _looped_swiglu(xs, w1, w2, w3, load, g):
    """The same with one matmul per expert that received rows (a host sync for the counts): decoding one token
    touches k of N experts, where grouped_mm visits the empty groups too."""
    outs, start = [], 0
    for e, n in enumerate(load.long().tolist()):
        if n:
            xe = xs[start:start + n]
            outs.append((F.silu(xe @ w1[e]) * (xe @ w3[e]) * g[start:start + n]) @ w2[e])
            start += n
    return torch.cat(outs) if outs else xs.new_zeros(0, w2.shape[-1])


def gathered(experts, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The same output for a few tokens (compiled decoding, DeepSeekV3.decode_step): each token's k experts are
    read by index, with no sort, host sync or data-dependent shape. Written as products and sums that
    torch.compile fuses into loops over the chosen experts' weights in place; run eagerly, it would build
    (tokens, k, dim, inter) tensors."""
    a1 = (x[:, None, :, None] * experts.w1[indices]).sum(2)  # (tokens, k, inter)
    a3 = (x[:, None, :, None] * experts.w3[indices]).sum(2)
    y = ((F.silu(a1) * a3).unsqueeze(-1) * experts.w2[indices]).sum(2)  # (tokens, k, dim)
    return (gates.unsqueeze(-1).to(y.dtype) * y).sum(1).to(x.dtype)
