"""Multi-token prediction (DeepSeek-V3 §2.2): `MTPLayer`, one module per prediction depth k = 1..D.

Depth k at position i combines the previous depth's representation h_i^{k-1} (k = 1: the main model's last hidden
state, after its final RMSNorm) with the embedding of token t_{i+k}, each RMS-normalised, through M_k (eq. 21):
    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]
runs one Transformer block (eq. 22; MLA + MoE, the same `Block` class as the trunk), normalises the result
(DeepSeek's `shared_head.norm`) and predicts t_{i+k+1} through the output head shared with the main model (eq. 23).
The normalised h_i^k is also what depth k + 1 receives: the causal chain across depths. The embedding and the
output head are the main model's own tensors, never copies. Eq. 21 as printed puts RMSNorm(h_i^{k-1}) first;
DeepSeek's released weights and transformers concatenate the embedding first, which is what this follows (and
writes above); depth 1 sees the main model's hidden state after its final norm, as they do. The loss weight
lambda (config.mtp_loss_weight, eq. 25) is 0.3 for DeepSeek-V3's first 10T training tokens and 0.1 after.
The training objective (eq. 24-25) and the speculative decoding that uses these layers as a draft (through the
same static step as the trunk's blocks, `model.static_step`) live in model.py and speculative.py; nothing here
knows about losses, caches' bookkeeping or sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Linear, RMSNorm


class MTPLayer(nn.Module):
    """Depth k's module: enorm, hnorm and eh_proj (M_k, 2d -> d) of eq. 21, `block` (TRM_k of eq. 22) and `norm`
    (the norm of the shared head, eq. 23). Names follow DeepSeek-V3's checkpoint (model.layers.{n_layers + k - 1}.
    enorm / hnorm / eh_proj / shared_head.norm, and the block's usual names), so the export is a renaming."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = block
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos, sin, cache=None, mask=None, losses: bool = True):
        """h (B, T, dim): h_i^{k-1}; emb (B, T, dim): Emb(t_{i+k}) at the same positions i.
        -> (h_i^k normalised, the input of the shared head and of depth k + 1; the block's router losses)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # eq. 21
        x, balance, z = self.block(x, cos, sin, cache, mask, losses)  # eq. 22
        return self.norm(x), balance, z
