"""Attention: Multi-Head Latent Attention (DeepSeek-V2 §2.1) and the GQA baseline, plus `KVCache`.

MLA compresses each token's keys and values into one latent c_kv (kv_lora_rank values, eq. 9) and
adds one decoupled RoPE key k_pe (qk_rope_head_dim values, eq. 15) projected from the hidden state
and shared by every head. Only (c_kv, k_pe) is cached. Decoding can read the cache two ways:
  naive    -- up-project the cached latent to per-head k_nope and v every step (eq. 10-11);
  absorbed -- fold W_UK into the query and W_UV into the output (§2.1.2, DeepSeek's attn_impl="absorb"),
              so attention runs directly against the latent and nothing is re-expanded.
`MLA.decode` is the absorbed path for one new position with static shapes (a tensor position, the whole
preallocated cache under a mask), so that torch.compile makes one graph for every position.
Full-sequence causal attention (training, prefill) is SDPA's flash kernel, or on the CPU for short sequences
`CausalAttention`, the same attention spelled out with its own backward (faster there).
`GQA` (grouped-query attention, LLaMA style) is the dense baseline for the smollm2-135m preset.
Masks, positions and the cache's bookkeeping are built by the model, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Linear, RMSNorm, apply_rope, rope_into, workspace

PAD_V_FOR_FLASH = True  # causal full-sequence attention (training, prefill) takes SDPA's flash path
# causal full-sequence attention on the CPU takes CausalAttention while one layer's fp32 scores would fit in this
# many bytes (B x n_heads x T^2 x 4: 4.7 MB for the 174m at 2 x 256; it holds one batch row's at a time in a
# reused buffer); longer: the flash path
CPU_EXPLICIT_ATTN_MAX_BYTES = 64 << 20


class KVCache:
    """Preallocated per-layer decoding cache.

    For MLA it holds c_kv (n_layers, B, max_len, kv_lora_rank) and k_pe (n_layers, B, max_len, rope dim):
    exactly kv_lora_rank + qk_rope_head_dim values per token per layer. For GQA it holds k and v.
    `pos` counts the tokens already written; `key_mask` (B, max_len), when set, marks real tokens
    (False = left padding that no query may attend to). `absorb` picks the MLA decode path.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, absorb: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"cache length must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        if batch < 1:
            raise ValueError(f"cache batch must be >= 1, got {batch}")
        self.cfg, self.batch, self.max_len, self.absorb = cfg, batch, max_len, absorb
        self.pos = 0
        self.key_mask: torch.Tensor | None = None
        L = cfg.n_layers
        if cfg.attn == "mla":
            self.c_kv = torch.zeros(L, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
            self.k_pe = torch.zeros(L, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
            self.tensors = (self.c_kv, self.k_pe)
        else:
            shape = (L, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
            self.tensors = (self.k, self.v)

    def bytes_per_token(self) -> int:
        """Bytes one cached token occupies, summed over layers (measured from the tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors) // (self.batch * self.max_len)


class CausalAttention(torch.autograd.Function):
    """MLA's causal full-sequence attention (training, prefill) spelled out from the projections themselves, for
    the CPU. Inputs: q (B, T, H, nope + rope), the query projection before RoPE; kv (B, T, H, nope + v), W^UKV's
    up-projection of the latent (k_nope and v of every head); k_pe (B, T, rope), the shared RoPE key, rotated.
    Output (B, T, H, v), the layout W^O reads. Per batch row, one baddbmm writes the scaled, masked scores
    q_nope k_nope^T and one GEMM adds the decoupled term q_pe k_pe^T for all heads at once (eq. 16's two halves,
    so neither [q_nope; q_pe] nor [k_nope; k_pe] is ever concatenated nor k_pe copied per head); the softmax runs
    in place; every product reads its operands as strided views of q and kv and writes straight into o (and into
    the gradients dq, dkv in the backward). On a 2-core CPU the concatenations, layout copies and the splits'
    and transposes' backward were ~20% of the attention's time, mostly faulting in their fresh pages.
    Backward recomputes the probabilities P (so only the inputs and the output are kept, as for the flash
    kernel: no H x T^2 tensor per layer between forward and backward) and applies the textbook gradient,
    dS = P * (dP - rowsum(dO * O)) as in FlashAttention-2. Under bf16 autocast it keeps FlashAttention-2's
    precisions: scores, softmax and dS in fp32, the other five matmuls (P V, dP, dQ, dK, dV) on bf16 operands.
    The CPU has no bf16 x bf16 -> fp32 matmul, so the scores' product stays fp32 (rounding the scores to bf16
    doubled the error of the outputs and gradients against fp32, to twice that of torch's SDPA in bf16); fp32
    operands made the other five 3-5x slower on a 2-core AVX512-BF16 CPU."""

    @staticmethod
    def _buffer(slot: int, shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """Buffer `slot` (`layers.workspace`), shared by every layer and step: a fresh 5-64 MB tensor per layer
        costs a page fault per 4 KB and, freed between layers, fragmented glibc's heap (the 174m step's peak RSS
        rose by ~130 MB without reuse: `python -m dsv3 bench --sections memory`)."""
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
        p = torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place (tests/test_mla.py)
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


class MLA(nn.Module):
    """Multi-Head Latent Attention with decoupled RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_out = cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, q_out, bias=False)  # W^Q and W^QR together
        else:  # eq. 12-13: queries through their own low-rank latent c_q
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, q_out, bias=False)
        # eq. 9 + eq. 15: one down-projection gives the latent c_kv and the shared RoPE key k_pe
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        # eq. 10-11: W^UK and W^UV stacked per head: rows [h, :nope] -> k_nope, rows [h, nope:] -> v
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.qk_head_dim)  # softmax scale over nope + rope dims

    def _project(self, x, cos, sin):
        """x (B, T, dim) -> q (B, T, H, nope + rope) before RoPE, and what is cached: c_kv (B, T, r), k_pe (B, T,
        rope)."""
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)  # the latent is normalised before caching and up-projection
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, rope), shared by all heads
        return q.view(B, T, self.n_heads, -1), c_kv, k_pe

    def _heads(self, q, cos, sin):
        """q (B, T, H, nope + rope) -> q_nope, q_pe (B, H, T, ·), q_pe rotated."""
        q_nope, q_pe = q.transpose(1, 2).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer_id: int = 0, mask=None):
        B, T, _ = x.shape
        q, c_kv, k_pe = self._project(x, cos, sin)
        if cache is not None:
            s = cache.pos
            cache.c_kv[layer_id, :, s:s + T] = c_kv
            cache.k_pe[layer_id, :, s:s + T] = k_pe
            if mask is not None:  # attend over everything cached so far
                c_kv = cache.c_kv[layer_id, :, :s + T].to(x.dtype)
                k_pe = cache.k_pe[layer_id, :, :s + T].to(x.dtype)
                if cache.absorb:
                    return self.wo(self._absorbed(*self._heads(q, cos, sin), c_kv, k_pe, mask))
        if (mask is None and x.device.type == "cpu" and cos.dim() == 2  # one position table for every row
                and B * self.n_heads * T * T * 4 <= CPU_EXPLICIT_ATTN_MAX_BYTES
                and not torch.compiler.is_compiling()):  # compiled: SDPA, which inductor lowers itself
            kv = self.wkv_b(c_kv).view(B, T, self.n_heads, -1)
            o = CausalAttention.apply(q, kv, k_pe, cos, sin, self.scale, self.nope)
            return self.wo(o.view(B, T, -1))
        return self.wo(self._naive(*self._heads(q, cos, sin), c_kv, k_pe, mask))

    def decode(self, x, cos, sin, c_kv, k_pe, pos, mask):
        """One new position per row with static shapes, for a compiled decoding step (DeepSeekV3.decode_step): its
        latent is written at `pos` (a 0-d tensor, so a new position is not a new graph) of this layer's cache
        c_kv (B, S, r) and k_pe (B, S, rope), and absorbed attention runs over all S slots; `mask` (B|1, 1, 1, S)
        is True for the slots it may see (those up to pos, minus padding)."""
        q, c, kpe = self._project(x, cos, sin)
        q_nope, q_pe = self._heads(q, cos, sin)
        c_kv.index_copy_(1, pos.view(-1), c.to(c_kv.dtype))  # (or T positions (T,) for T new tokens per row)
        k_pe.index_copy_(1, pos.view(-1), kpe.to(k_pe.dtype))
        return self.wo(self._absorbed(q_nope, q_pe, c_kv.to(x.dtype), k_pe.to(x.dtype), mask))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Up-project the latent to per-head keys and values, then standard attention."""
        B, H, T, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.wkv_b(c_kv).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, S, self.rope)], dim=-1)
        pad = q.shape[-1] - self.v_dim
        if mask is None and pad > 0 and PAD_V_FOR_FLASH:
            # torch's flash kernels (CPU and CUDA) need v_head_dim == qk head dim: zero columns appended to V
            # give zero output columns, dropped again. Fused, no (T, T) scores kept for backward.
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o[..., : self.v_dim].transpose(1, 2).reshape(B, T, H * self.v_dim)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention against the latent: q_nope W_UK scores c_kv directly; W_UV is applied after."""
        B, H, T, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk).reshape(B, H * T, -1)  # (B, H*T, kv_lora_rank)
        # every head's queries are rows of one matmul per batch row against the shared c_kv and k_pe: no copy of
        # the cache per head, and H*T rows where a per-head product has T (torch.compile on CPU turns products with
        # one row into generated loops, which read the cache at a fraction of the bandwidth)
        scores = torch.baddbmm(q_pe.reshape(B, H * T, -1) @ k_pe.transpose(1, 2), q_lat, c_kv.transpose(1, 2))
        scores = (scores.view(B, H, T, -1).float() * self.scale).masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = (p.view(B, H * T, -1) @ c_kv).view(B, H, T, -1)  # (B, H, T, kv_lora_rank)
        o = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
        return o.transpose(1, 2).reshape(B, T, H * self.v_dim)


class GQA(nn.Module):
    """Grouped-query attention with RoPE on full heads (the SmolLM2 / LLaMA baseline)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer_id: int = 0, mask=None):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, -1).transpose(1, 2), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, -1).transpose(1, 2), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        if cache is not None:
            s = cache.pos
            cache.k[layer_id, :, :, s:s + T] = k
            cache.v[layer_id, :, :, s:s + T] = v
            if mask is not None:
                k = cache.k[layer_id, :, :, :s + T].to(x.dtype)
                v = cache.v[layer_id, :, :, :s + T].to(x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))
