"""Replaces `model.head_loss` (logits = h W^T, then their cross-entropy) with `LinearCrossEntropy`: the head and
the loss fused over row chunks, so the (tokens, vocab) logits never exist at once and every op after the matmul
works in place; and `model.embed_tokens`, for a tied embedding, with `TiedEmbedding`, whose backward adds into
the head's weight gradient instead of building a second dense (vocab, dim) one. The two meet through `_TIED`,
keyed by the weight, here and nowhere else. `kernels.model_head_loss` and `kernels.model_embed_tokens`
(kernels/__init__.py) say when each runs.
tests/kernels/test_head.py checks losses and gradients against the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .buffers import workspace
from .linear import onednn_mm, use_onednn

CE_CHUNK = 256  # rows per chunk of the fused head + cross-entropy on the CPU, at least (x 50,257 fp32 = 51 MB, reused)
CE_CHUNK_ELEMS = 65536  # ... and at least this many h elements (rows x dim) per chunk: 512 rows at dim 128 (`tiny`)
INPLACE_CE_DEVICES = ("cpu",)  # device types whose chunk log-softmax runs in place in reused buffers
CE_CHUNK_ACCEL = 4096  # rows per chunk elsewhere (GPUs): fewer, larger matmuls and fewer bf16 dW partials to sum
CE_LOGITS_BLOCK = 2048  # CPU fp32: the chunk's logits by oneDNN in blocks of this many classes (see _chunk_logits)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out (rows, V) = h @ w^T, into a view of a kept buffer. CPU fp32: oneDNN, CE_LOGITS_BLOCK classes at a
    time (its result is a fresh tensor; small blocks are reused from the heap), each copied in while in cache."""
    if not use_onednn(h, w):
        torch.mm(h, w.t(), out=out)
        return
    for j in range(0, w.shape[0], CE_LOGITS_BLOCK):
        out[:, j:j + CE_LOGITS_BLOCK].copy_(onednn_mm(h, w[j:j + CE_LOGITS_BLOCK]))


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W^T, targets) without ever holding the (tokens, vocab) logits: row chunks (CE_CHUNK rows and
    CE_CHUNK_ELEMS elements of h at least, on the CPU), and each chunk's gradient (softmax - onehot) is used at
    once for dh and dW, so backward only rescales them.
    Same matmuls as the plain head + F.cross_entropy (no recompute). Targets == -100 are ignored. Under autocast
    the matmuls run in the autocast dtype and the (log-)softmax in fp32, as autocast does for the plain path.
    On the CPU every op after the matmul works in place in buffers kept from step to step (`buffers.workspace`),
    the fp32 dW included."""

    @staticmethod
    def forward(ctx, h, weight, targets, tied=None):
        # One piece on purpose: the chunk loop shares a dozen buffers and consumes each chunk's gradient in place
        # as soon as it exists (that is the kernel); split, those would travel between functions as arguments.
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        inplace = h.device.type in INPLACE_CE_DEVICES
        n_rows = h.shape[0]
        # CPU: narrow h gets more rows per chunk (a chunk of h holds at least CE_CHUNK_ELEMS elements)
        rows = max(CE_CHUNK, CE_CHUNK_ELEMS // h.shape[1]) if inplace else CE_CHUNK_ACCEL
        chunk = max(1, min(rows, n_rows))
        V = weight.shape[0]
        # The chunk buffers' rows are padded to Vp, a multiple of 64, whose padding logits are -inf (probability 0,
        # gradient 0): aligned rows for the GEMMs (`python benchmarks/head_gemm.py`). Accelerators pad W too, with
        # zero rows; the CPU keeps W as is and its GEMMs read the (rows, V) view.
        Vp = -(-V // 64) * 64
        buf = functools.partial(workspace, weight) if inplace else \
            (lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=h.device))
        with torch.autocast(h.device.type, enabled=False):
            # the CPU casts W into a kept buffer
            hc = h.to(dt)
            wc = buf("w_cast", weight.shape, dt).copy_(weight) if inplace and dt != weight.dtype else weight.to(dt)
            if not inplace and Vp != V:
                wc = F.pad(wc, (0, 0, 0, Vp - V))
            Vw = wc.shape[0]  # the classes the GEMMs see: Vp on accelerators, V on the CPU
            valid = targets != -100
            n = valid.sum()
            row_w = valid / n  # d(mean CE)/d(row's CE): 1/n, 0 for ignored rows (folded into dh and dW here)
            total = h.new_zeros((), dtype=torch.float32)
            dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
            z = buf("z", (chunk, Vp), dt)  # logits, then the gradient in dt
            # the in-place path's fp32 probabilities overwrite the logits; bf16 logits: an fp32 buffer of their own
            probs = buf("probs", z.shape, torch.float32) if inplace and dt != torch.float32 else z
            # accelerators: a chunk's dW in dt, summed in fp32; the in-place path sums fp32 products instead
            dw_c = torch.empty(wc.shape, dtype=dt, device=h.device) \
                if need_grad and dt != torch.float32 and not inplace else None
            # fp32 products write dW with the first chunk's (no pass to zero 4 x vocab x dim bytes); dt partials add.
            # A fresh view of the kept buffer: autograd then takes it as the weight's .grad without a copy
            dw = (buf("dw", wc.shape, torch.float32).view(wc.shape) if dw_c is None else
                  torch.zeros(wc.shape, dtype=torch.float32, device=h.device)) if need_grad else None
            for i in range(0, n_rows, chunk):
                rows = slice(i, i + chunk)
                c = hc[rows].shape[0]
                zc, pc = z[:c], probs[:c]
                _chunk_logits(hc[rows], wc, zc[:, :Vw])
                zc[:, V:] = float("-inf")  # the padding classes
                tgt, ok, rw = targets[rows].clamp(min=0), valid[rows], row_w[rows, None]
                if inplace:  # in place into the reused fp32 buffer (tested here; CPU has no bf16 -> fp32 variant): the
                    # softmax, so the gradient needs no exp pass over the chunk after a log-softmax; CE = -log p_target
                    pc = torch.ops.aten._softmax.out(zc if pc is zc else pc.copy_(zc), 1, False, out=pc)
                    ce = _ce_from_probs(pc, tgt, hc[rows], wc)
                else:  # accelerators: a fresh tensor from the caching allocator costs nothing; no aliasing or host sync
                    lp = zc.float().log_softmax(dim=1)
                    ce = -lp.gather(1, tgt[:, None]).squeeze(1)
                    pc = lp.exp_() if need_grad else None
                total += (ce * ok).sum()
                if need_grad:  # d(mean CE)/d logits = (softmax - onehot) / n; ignored rows are zeroed by rw
                    g32 = pc[:, :Vw]
                    g32[torch.arange(c, device=pc.device), tgt] -= 1
                    g = g32 if dt == torch.float32 else zc[:, :Vw].copy_(g32)
                    dh[rows] = (g @ wc).float() * rw
                    if dw_c is None:  # fp32 products: bf16-rounded chunk partials made bf16 training spike on CPU
                        if i == 0:
                            torch.mm(g32.t(), h[rows].float() * rw, out=dw)
                        else:
                            dw.addmm_(g32.t(), h[rows].float() * rw)
                    else:  # the 0/1 row mask in dt (exact); 1/n once in fp32 below, not rounded to dt
                        dw.add_(torch.mm(g.t(), hc[rows] * ok[:, None].to(dt), out=dw_c))
            if dw_c is not None:
                dw.div_(n)
        ctx.save_for_backward(dh, dw)
        ctx.vocab, ctx.tied = V, tied
        return total / n

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        if dw is not None:
            # scaled in place: dW is as large as the embedding. The CPU skips that pass over it when the loss's
            # gradient is 1 (the usual case: the trainer's loss is a sum that includes this mean); the version
            # bump still makes a second backward fail the saved-tensor check instead of returning stale grads.
            if dw.device.type == "cpu" and grad.item() == 1.0:
                torch.autograd.graph.increment_version(dw)
            else:
                dw.mul_(grad)
            dw = dw[:ctx.vocab].to(ctx.w_dtype)
            if ctx.tied is not None:  # the tied embedding's backward adds its rows into this same tensor
                ctx.tied.dw = dw
        return dh.mul_(grad).to(ctx.h_dtype) if dh is not None else None, dw, None, None


def _ce_from_probs(p: torch.Tensor, tgt: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy -log p[target] from its fp32 softmax p. Where p[target] is below 1e-30 (a CE
    above 69 nats, near fp32's underflow) the row's logits h @ w^T are recomputed and its CE is logsumexp - logit."""
    pt = p.gather(1, tgt[:, None]).squeeze(1)
    ce = -pt.log()
    low = pt < 1e-30
    if low.any():
        z = (h[low] @ w.t()).float()
        ce[low] = torch.logsumexp(z, dim=1) - z.gather(1, tgt[low, None]).squeeze(1)
    return ce


class _TiedGrad:
    """Hands the head's dW (from LinearCrossEntropy.backward) to the backward of the tied embedding lookup."""

    dw: torch.Tensor | None = None


class TiedEmbedding(torch.autograd.Function):
    """F.embedding(tokens, weight) for a weight tied to the fused head (LinearCrossEntropy with the same `tied`).
    Its backward adds the looked-up rows' gradients in place into the head's dW, which autograd then accumulates as
    the weight's gradient, where nn.Embedding would build a dense (vocab, dim) zero gradient and autograd would add
    it to the head's in a third (vocab, dim) tensor. The head's backward always runs first (the embedding is the
    graph's input end); if it did not give a dW (a loss without the fused head), the gradient is the dense one."""

    @staticmethod
    def forward(ctx, weight, tokens, tied):
        ctx.save_for_backward(tokens)
        ctx.tied, ctx.shape = tied, weight.shape
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        dw, ctx.tied.dw = ctx.tied.dw, None
        rows = grad.reshape(-1, grad.shape[-1])
        if dw is None:
            return grad.new_zeros(ctx.shape).index_add_(0, tokens.reshape(-1), rows), None, None
        dw.index_add_(0, tokens.reshape(-1), rows.to(dw.dtype))
        return None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         tied: _TiedGrad | None = None) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100) with no full logits tensor (see LinearCrossEntropy).
    tied: shared with a TiedEmbedding of the same weight, whose backward then adds into this head's dW."""
    return LinearCrossEntropy.apply(h, weight, targets, tied)


_TIED = WeakIdKeyDictionary()  # weight -> the _TiedGrad of its last tied lookup, until a head loss takes it


def tied_embedding(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """F.embedding(tokens, weight) as a `TiedEmbedding`, linked (through _TIED, keyed by the weight) to the next
    `take_tied(weight)`, the fused head loss of the same forward, whose backward hands it the head's dW."""
    _TIED[weight] = tied = _TiedGrad()
    return TiedEmbedding.apply(weight, tokens, tied)


def untied(weight: torch.Tensor) -> None:
    """A plain lookup follows: drop any link left from an earlier forward (returns None: the reference runs)."""
    _TIED.pop(weight, None)


def take_tied(weight: torch.Tensor) -> _TiedGrad | None:
    """The link of this forward's tied lookup, if it made one; taken once."""
    return _TIED.pop(weight, None)
