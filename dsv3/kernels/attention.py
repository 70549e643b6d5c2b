"""Replaces `mla.attention` (MLA's attention from its projections) where no mask is needed (training, prefill):

  CausalAttention   the attention written out for the CPU with its own backward, in kept buffers, no
                    concatenations, while one layer's fp32 scores fit in CPU_MAX_SCORE_BYTES
  flash_attention   SDPA's fused flash kernel, which needs V as wide as Q and K, so V gets zero columns that are
                    dropped again (GPUs, long CPU sequences, torch.compile)

Which one a call takes: `kernels.mla_attention` (kernels/__init__.py). Both compute the reference's numbers;
tests/kernels/test_attention.py compares values and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .buffers import workspace

# the CPU kernel runs while B x n_heads x T^2 fp32 scores fit in this many bytes (one batch row's at a time
# in a reused buffer); longer sequences take the flash path
CPU_MAX_SCORE_BYTES = 64 << 20


def rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """`layers.apply_rope`'s rotation written into `out` (any strides, e.g. a view of a gradient), in out's dtype,
    without temporaries; inverse=True rotates back (the transpose: a gradient through RoPE)."""
    sign = -1.0 if inverse else 1.0
    r2 = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :r2], x[..., r2:], out[..., :r2], out[..., r2:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class CausalAttention(torch.autograd.Function):
    """`mla.attention` without a mask (training, prefill), written out for the CPU. Inputs as there: q (B, T, H,
    nope + rope) before RoPE, kv (B, T, H, nope + v), k_pe (B, T, rope) rotated; output (B, T, H, v).
    Per batch row, one baddbmm writes the scaled, masked scores q_nope k_nope^T and one GEMM adds q_pe k_pe^T for
    all heads at once (eq. 16's two halves: [q_nope; q_pe] and [k_nope; k_pe] are never concatenated, k_pe never
    copied per head); the softmax runs in place; every product reads strided views and writes straight into its
    output, and in the backward into dq, dkv and dk_pe.
    The backward recomputes the probabilities P (only the inputs and the output are kept, as in a flash kernel)
    and applies dS = P * (dP - rowsum(dO * O)) as in FlashAttention-2. Under bf16 autocast it keeps
    FlashAttention-2's precisions: scores, softmax and dS in fp32, the other five matmuls on bf16 operands."""

    @staticmethod
    def _buffer(slot: int, shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """Buffer `slot` (`buffers.workspace`), shared by every layer and step."""
        return workspace(CausalAttention, slot, shape, dtype, like.device)

    @staticmethod
    def _probs(b, q_nope, k_nope, q_pe, k_pe, scale, dt):
        """P = softmax(scores + causal mask) of batch row b as (H, T, T) in the scores' dtype, and in dt for the
        matmuls (the same buffer when those agree). Buffers 0 (scores) and 2 (dt, bf16 only)."""
        _, T, H, _ = q_nope.shape
        mask = q_nope.new_full((T, T), float("-inf")).triu_(1)  # additive: 0 on and below the diagonal
        s = CausalAttention._buffer(0, (H, T, T), q_nope.dtype, q_nope)
        torch.baddbmm(mask, q_nope[b].transpose(0, 1), k_nope[b].permute(1, 2, 0), alpha=scale, out=s)
        s.view(H * T, T).addmm_(q_pe[b].view(H * T, -1), k_pe[b].t(), alpha=scale)  # every head against one k_pe
        p = torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place (tests/kernels/test_attention.py)
        return p, (p if dt == p.dtype else CausalAttention._buffer(2, p.shape, dt, q_nope).copy_(p))

    @staticmethod
    def _score_operands(q, kv, k_pe, cos, sin, nope, acc):
        """q_nope, k_nope (strided views, or copies in `acc`), q_pe rotated into a fresh (B, H, T, rope), k_pe."""
        B, T, H, d = q.shape
        q_pe = rope_into(q.new_empty((B, H, T, d - nope), dtype=acc), q[..., nope:].transpose(1, 2), cos, sin)
        return q[..., :nope].to(acc), kv[..., :nope].to(acc), q_pe, k_pe.to(acc)

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, kv, k_pe, cos, sin, scale, nope):
        """-> o (B, T, H, v_head_dim) in the autocast dtype (else kv's); cos, sin (T, rope / 2)."""
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else kv.dtype
        acc = torch.promote_types(dt, torch.float32)  # the scores' dtype: fp32 for bf16 and fp32
        with torch.autocast("cpu", enabled=False):
            B, T, H, _ = q.shape
            qn, kn, qp, kp = CausalAttention._score_operands(q, kv, k_pe, cos, sin, nope, acc)
            v = kv[..., nope:].to(dt)
            o = q.new_empty((B, T, H, v.shape[-1]), dtype=dt)
            for b in range(B):
                pd = CausalAttention._probs(b, qn, kn, qp, kp, scale, dt)[1]
                torch.bmm(pd, v[b].transpose(0, 1), out=o[b].transpose(0, 1))
        ctx.save_for_backward(q, kv, k_pe, cos, sin, o)
        ctx.scale, ctx.nope = scale, nope
        return o

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable  # it works in reused buffers
    def backward(ctx, do):
        q, kv, k_pe, cos, sin, o = ctx.saved_tensors
        scale, nope = ctx.scale, ctx.nope
        B, T, H, _ = q.shape
        dt = o.dtype
        acc = torch.promote_types(dt, torch.float32)
        with torch.autocast("cpu", enabled=False):
            qn, kn, qp, kp = CausalAttention._score_operands(q, kv, k_pe, cos, sin, nope, acc)
            q_dt, kv_dt, qp_dt, kp_dt = q.to(dt), kv.to(dt), qp.to(dt), kp.to(dt)
            do = do.to(dt)
            delta = (do.to(acc) * o.to(acc)).sum(-1)  # rowsum(dO * O): (B, T, H)
            dq = q.new_empty(q.shape, dtype=dt)
            dkv = kv.new_empty(kv.shape, dtype=dt)
            dk_pe = k_pe.new_empty(k_pe.shape, dtype=dt)
            g_pe = CausalAttention._buffer(4, (H, T, qp.shape[-1]), dt, q)
            for b in range(B):
                p, pd = CausalAttention._probs(b, qn, kn, qp, kp, scale, dt)
                do_b, v_b = do[b].transpose(0, 1), kv_dt[b, :, :, nope:].transpose(0, 1)  # (H, T, ·)
                dp = torch.bmm(do_b, v_b.transpose(1, 2), out=CausalAttention._buffer(1, p.shape, dt, q))
                ds = dp if dp.dtype == p.dtype else CausalAttention._buffer(3, p.shape, p.dtype, q).copy_(dp)
                ds.sub_(delta[b].t().unsqueeze(-1)).mul_(p)  # dS in place; the scale goes on dq, dk
                ds = ds if ds is dp else dp.copy_(ds)
                torch.bmm(pd.transpose(1, 2), do_b, out=dkv[b, :, :, nope:].transpose(0, 1))  # dV = P^T dO
                torch.bmm(ds, kv_dt[b, :, :, :nope].transpose(0, 1), out=dq[b, :, :, :nope].transpose(0, 1))
                torch.bmm(ds.transpose(1, 2), q_dt[b, :, :, :nope].transpose(0, 1),
                          out=dkv[b, :, :, :nope].transpose(0, 1))
                ds2 = ds.view(H * T, T)
                torch.mm(ds2, kp_dt[b], out=g_pe.view(H * T, -1))  # d(rotated q_pe), rotated back below
                rope_into(dq[b, :, :, nope:].transpose(0, 1), g_pe, cos, sin, inverse=True)
                torch.mm(ds2.t(), qp_dt[b].view(H * T, -1), out=dk_pe[b])  # summed over the heads
            for t in (dq, dkv[..., :nope], dk_pe):
                t.mul_(scale)
            return dq, dkv, dk_pe, None, None, None, None


def flash_attention(reference, q, kv, k_pe, cos, sin, scale, nope):
    """`mla.attention` without a mask, run by the `reference` itself with V zero-padded to the q/k head width: SDPA
    then takes its fused flash kernel (which needs them equal); the padding's zero outputs are dropped."""
    B, T, H, d = q.shape
    v = kv.shape[-1] - nope
    o = reference(q, F.pad(kv, (0, d - v)), k_pe, cos, sin, scale, nope)  # (B, T, H * d)
    return o.view(B, T, H, d)[..., :v].reshape(B, T, -1)
