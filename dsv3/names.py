"""The one map between dsv3's parameters and the names and layouts of transformers' / DeepSeek's checkpoints.

`hf_weights(model, ...)` gives, for every tensor name in such a file, our tensor (or a view of it), its shape in the
file, and the exact rewrite each way: `export_hf` writes `to_hf(ours)` under the name, `from_hf` copies
`from_hf(file tensor)` into ours. A new weight is added here once. The rewrites:

  RoPE layout  -- we rotate the first half of the rope dims against the second; DeepSeek's checkpoints (V2 always,
                  V3 with rope_interleave=True) pair adjacent dims: the rope rows of q and k_pe are permuted
                  [0, d/2, 1, d/2 + 1, ...] on export and back on import.
  latent norms -- transformers gives kv_a_layernorm / q_a_layernorm eps 1e-6 whatever rms_norm_eps says.
                  RMSNorm(s x; 1e-6) = RMSNorm(x; eps) for s = sqrt(1e-6 / eps), so the rows producing c_kv and c_q
                  are scaled by s, one precision wider (fl(x s) loses bits), and divided by s on import.
  experts      -- our stacked w1/w3 (N, dim, inter) and w2 (N, inter, dim) are per-expert nn.Linear (out, in)
                  gate_proj/up_proj/down_proj matrices in the file: one transpose each way.
  MTP layers   -- depth k is DeepSeek-V3's model.layers.{n_layers + k - 1} (enorm, hnorm, eh_proj,
                  shared_head.norm and the block's usual names); its embedding and head are the main model's.
Which file layout applies (which class, which config) is decided by `export_hf` and `hf`; nothing here reads files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .config import ModelConfig
from .model import DeepSeekV3
from .moe import MoE

HF_LATENT_NORM_EPS = 1e-6  # eps transformers gives DeepseekV2/V3's kv_a_layernorm and q_a_layernorm
WIDER = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}


class Weight(NamedTuple):
    """One tensor of the file: ours (a parameter or a view of it), its shape in the file, and the rewrites
    (None = the tensor as it is)."""

    ours: torch.Tensor
    shape: tuple[int, ...]
    to_hf: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_hf: Callable[[torch.Tensor], torch.Tensor] | None = None


def rope_perm(d: int) -> torch.Tensor:
    """Row order that turns our half-split rope dims into adjacent pairs: [0, d/2, 1, d/2 + 1, ...]."""
    return torch.arange(d).view(2, d // 2).t().reshape(-1)


def latent_scale(cfg: ModelConfig) -> float:
    """s with RMSNorm(s x; HF_LATENT_NORM_EPS) = RMSNorm(x; our latent eps): the rescale of the latent rows."""
    return math.sqrt(HF_LATENT_NORM_EPS / (cfg.latent_norm_eps or cfg.norm_eps))


def _same(t: torch.Tensor) -> Weight:
    return Weight(t, tuple(t.shape))


def _transposed(t: torch.Tensor) -> Weight:  # nn.Linear's (out, in) <-> our stacked experts' (in, out)
    return Weight(t, tuple(t.shape)[::-1], torch.t, torch.t)


class _MLARows:
    """MLA's row rewrites for one file layout: rope rows in adjacent pairs or not, latent rows scaled by s."""

    def __init__(self, cfg: ModelConfig, rope_pairs: bool, scale: float):
        r = cfg.qk_rope_head_dim
        self.cfg, self.s = cfg, scale
        self.perm = rope_perm(r) if rope_pairs else torch.arange(r)  # our order -> the file's
        self.back = torch.argsort(self.perm)  # the file's order -> ours

    def _heads(self, w, order):  # (H * (nope + rope), in): each head's rope rows reordered
        nope = self.cfg.qk_nope_head_dim
        w = w.view(self.cfg.n_heads, nope + self.cfg.qk_rope_head_dim, -1)
        return torch.cat([w[:, :nope], w[:, nope:][:, order]], 1).flatten(0, 1)

    def _scale(self, w):  # one precision wider, so that the import divides it back exactly
        return w if self.s == 1 else w.to(WIDER.get(w.dtype, w.dtype)) * self.s

    def _unscale(self, w):
        return w if self.s == 1 else w.double() / self.s

    def _kv_a_to_hf(self, w):  # rows [c_kv; k_pe]
        c_kv, k_pe = w.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim])
        c_kv = self._scale(c_kv)
        return torch.cat([c_kv, k_pe[self.perm].to(c_kv.dtype)])

    def _kv_a_from_hf(self, w):
        c_kv, k_pe = self._unscale(w[: self.cfg.kv_lora_rank]), w[self.cfg.kv_lora_rank:][self.back]
        return torch.cat([c_kv, k_pe.to(c_kv.dtype)])

    def q(self, t):  # q_proj / q_b_proj
        return Weight(t, tuple(t.shape), lambda w: self._heads(w, self.perm), lambda w: self._heads(w, self.back))

    def latent(self, t):  # q_a_proj
        return Weight(t, tuple(t.shape), self._scale, self._unscale)

    def kv_a(self, t):  # kv_a_proj_with_mqa
        return Weight(t, tuple(t.shape), self._kv_a_to_hf, self._kv_a_from_hf)


def _attention(p: str, a, cfg: ModelConfig, rows: _MLARows | None) -> dict[str, Weight]:
    if cfg.attn == "gqa":
        return {p + f"{theirs}.weight": _same(getattr(a, ours).weight)
                for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))}
    if cfg.q_lora_rank == 0:
        w = {p + "q_proj.weight": rows.q(a.wq.weight)}
    else:
        w = {p + "q_a_proj.weight": rows.latent(a.wq_a.weight), p + "q_a_layernorm.weight": _same(a.q_norm.weight),
             p + "q_b_proj.weight": rows.q(a.wq_b.weight)}
    w[p + "kv_a_proj_with_mqa.weight"] = rows.kv_a(a.wkv_a.weight)
    w[p + "kv_a_layernorm.weight"] = _same(a.kv_norm.weight)
    w[p + "kv_b_proj.weight"] = _same(a.wkv_b.weight)
    w[p + "o_proj.weight"] = _same(a.wo.weight)
    return w


def _swiglu(p: str, w1, w3, w2, weight=_same) -> dict[str, Weight]:
    return {p + "gate_proj.weight": weight(w1), p + "up_proj.weight": weight(w3), p + "down_proj.weight": weight(w2)}


def _mlp(p: str, f, cfg: ModelConfig, router_bias: bool) -> dict[str, Weight]:
    if not isinstance(f, MoE):
        return _swiglu(p, f.w1.weight, f.w3.weight, f.w2.weight)
    w = {p + "gate.weight": _same(f.gate.weight)}
    if router_bias:  # DeepseekV3's e_score_correction_bias, kept in fp32 as transformers keeps it
        w[p + "gate.e_score_correction_bias"] = Weight(f.gate.bias, tuple(f.gate.bias.shape), lambda b: b.float())
    e = f.experts
    for j in range(cfg.n_routed_experts):
        w.update(_swiglu(p + f"experts.{j}.", e.w1[j], e.w3[j], e.w2[j], _transposed))
    sh = f.shared_experts
    if sh is None:  # transformers always builds the shared MLP; width 0 makes it output zeros
        sh_w = e.w1.new_zeros(0, cfg.dim), e.w1.new_zeros(0, cfg.dim), e.w1.new_zeros(cfg.dim, 0)
    else:
        sh_w = sh.w1.weight, sh.w3.weight, sh.w2.weight
    w.update(_swiglu(p + "shared_experts.", *sh_w))
    return w


def hf_weights(model: DeepSeekV3, *, rope_pairs: bool, latent_scale: float, router_bias: bool) -> dict[str, Weight]:
    """transformers / DeepSeek tensor name -> Weight, in the file's order. rope_pairs: the file pairs adjacent rope
    dims; latent_scale: s of the latent rows (1 = none); router_bias: MoE layers carry e_score_correction_bias."""
    cfg = model.cfg
    w = {"model.embed_tokens.weight": _same(model.embed.weight), "model.norm.weight": _same(model.norm.weight)}
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = _same(model.head.weight)
    rows = _MLARows(cfg, rope_pairs, latent_scale) if cfg.attn == "mla" else None
    blocks = [(f"model.layers.{i}.", block) for i, block in enumerate(model.layers)]
    for k, layer in enumerate(model.mtp or []):  # DeepSeek-V3's MTP layers: model.layers.{n_layers + k}
        p = f"model.layers.{cfg.n_layers + k}."
        for ours, theirs in ((layer.enorm, "enorm"), (layer.hnorm, "hnorm"), (layer.eh_proj, "eh_proj"),
                             (layer.norm, "shared_head.norm")):
            w[p + theirs + ".weight"] = _same(ours.weight)
        blocks.append((p, layer.block))
    for p, block in blocks:
        w[p + "input_layernorm.weight"] = _same(block.attn_norm.weight)
        w[p + "post_attention_layernorm.weight"] = _same(block.ffn_norm.weight)
        w.update(_attention(p + "self_attn.", block.attn, cfg, rows))
        w.update(_mlp(p + "mlp.", block.ffn, cfg, router_bias))
    return w
