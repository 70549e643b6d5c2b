"""Multi-Head Latent Attention (DeepSeek-V2 §2.1) with decoupled RoPE, and the GQA baseline.

MLA compresses each token's keys and values into one latent c_kv of kv_lora_rank values (eq. 9) and adds one
RoPE key k_pe of qk_rope_head_dim values (eq. 15), projected from the hidden state and shared by every head.
Only (c_kv, k_pe) is cached (cache.py). Attention can read that cache two ways, both here:
  naive    -- up-project the latent to every head's k^C and v^C (eq. 10-11), then ordinary attention;
  absorbed -- fold W^UK into the query and W^UV into the output (§2.1.2; DeepSeek's attn_impl="absorb"), so the
              scores are taken against the latent itself and nothing is re-expanded per token.
`GQA` (grouped-query attention, LLaMA style) is the dense baseline of the smollm2-135m preset.
Masks, positions and the cache's bookkeeping live in cache.py; faster attention kernels in kernels/attention.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache
from .config import ModelConfig
from .layers import Linear, RMSNorm, apply_rope, yarn_mscale

__all__ = ["MLA", "GQA", "KVCache", "attention"]


class MLA(nn.Module):
    """Multi-Head Latent Attention with decoupled RoPE. Weight names follow DeepSeek's inference code."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        # the projections in the order their parameters were first registered (the state dict, the initial random
        # draws and the optimizer's state follow it), so queries (eq. 12-14) come before the latent (eq. 9-11)
        q_out = cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, q_out, bias=False)  # W^Q and W^QR together
        else:  # eq. 12-13: queries through their own low-rank latent c_q (saves activation memory in training)
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps or cfg.norm_eps)
            self.wq_b = Linear(cfg.q_lora_rank, q_out, bias=False)  # W^UQ and W^QR together
        # eq. 9 + eq. 15: one down-projection gives the latent c_kv and the shared RoPE key k_pe
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # W^DKV and W^KR
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps or cfg.norm_eps)
        # eq. 10-11: W^UK and W^UV stacked per head: rows [h, :nope] -> k^C, rows [h, nope:] -> v^C
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)  # eq. 19: W^O
        self.scale = 1.0 / math.sqrt(cfg.qk_head_dim)  # softmax scale over the nope + rope dims
        if cfg.yarn_mscale_all_dim:  # YaRN: every dim's logits, not only the rotated ones, get the temperature
            self.scale *= yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, dim) -> q (B, T, H, nope + rope) before RoPE, and what is cached: c_kv (B, T, kv_lora_rank),
        k_pe (B, T, rope), rotated."""
        B, T, _ = x.shape
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)  # eq. 9, and W^KR h of eq. 15
        c_kv = self.kv_norm(c_kv)  # the latent is normalised before it is cached and up-projected (eq. 10-11)
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))  # eq. 12-13; eq. 14's W^QR c_q
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # eq. 15: one rotated key per token, for every head
        return q.view(B, T, self.n_heads, -1), c_kv, k_pe

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer_id: int = 0, mask=None):
        """x (B, T, dim) -> (B, T, dim). With a cache, the new latents are written at cache.pos and attention
        covers everything cached so far (under `mask`); the model advances cache.pos after the last layer."""
        q, c_kv, k_pe = self.project(x, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(layer_id, c_kv, k_pe)
            if cache.absorb and mask is not None:
                return self.wo(self.absorbed(q, c_kv, k_pe, cos, sin, mask))
        return self.wo(self.naive(q, c_kv, k_pe, cos, sin, mask))

    def naive(self, q, c_kv, k_pe, cos, sin, mask):
        """eq. 10-11 then attention: every head's keys and values up-projected from the latent c_kv (B, S, r)."""
        B, S, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim)
        return attention(q, kv, k_pe, cos, sin, self.scale, self.nope, mask)

    def absorbed(self, q, c_kv, k_pe, cos, sin, mask):
        """§2.1.2: q^C k^C = (q^C W^UK) c_kv, so W^UK folds into the query and the scores read the latent c_kv
        (B, S, r) directly; likewise W^UV is applied once to the attention-weighted latent, not per key."""
        B, T, H, _ = q.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        q_nope = q[..., :self.nope].transpose(1, 2)  # (B, H, T, nope)
        q_pe = apply_rope(q[..., self.nope:].transpose(1, 2), cos, sin)  # (B, H, T, rope)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # the query in latent space
        scores = torch.einsum("bhtr,bsr->bhts", q_lat, c_kv) + torch.einsum("bhtd,bsd->bhts", q_pe, k_pe)
        scores = (scores.float() * self.scale).masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsr->bhtr", p, c_kv)  # attention over latents
        o = torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)  # up-project once per query: v^C never materialises
        return o.reshape(B, T, H * self.v_dim)


@kernels.fast_path(kernels.mla_attention)
def attention(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              scale: float, nope: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's attention from its projections (eq. 16-18): q (B, T, H, nope + rope) before RoPE; kv (B, S, H,
    nope + v), every head's [k^C; v^C] up-projected from the latent; k_pe (B, S, rope), the shared RoPE key,
    already rotated. Returns (B, T, H * v), the heads concatenated for W^O. mask (B|1, 1, T, S) or None (causal)."""
    B, T, H, _ = q.shape
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    q_pe = apply_rope(q_pe.transpose(1, 2), cos, sin).transpose(1, 2)  # eq. 14: q^R = RoPE(W^QR c_q)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q = torch.cat([q_nope, q_pe], dim=-1)  # eq. 16: q = [q^C; q^R]
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)  # eq. 17: k = [k^C; k^R], k^R shared
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None, scale=scale)  # eq. 18
    return o.transpose(1, 2).reshape(B, T, -1)


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
            k, v = cache.update(layer_id, k, v, seq_dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))
