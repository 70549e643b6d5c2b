"""The DeepSeek-V3 language model: `Block`, `DeepSeekV3`, `ModelOutput`; after it, `check_inputs` and `count_params`.

A pre-norm decoder: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)), where Attn is MLA (or GQA for the dense
baseline) and FFN is DeepSeekMoE (or a dense SwiGLU for the first n_dense_layers, and for the baseline).
`forward(tokens, targets)` returns logits and, with targets, the losses
loss = ce + aux_loss_coef * balance + z_loss_coef * z (router losses averaged over the MoE layers)
+ mtp_loss_weight / D * sum_k CE_k with D multi-token prediction modules (mtp.py, DeepSeek-V3 §2.2).
Targets are the next tokens, already shifted by the data pipeline; the model never shifts again.
Incremental decoding goes through `new_cache()` (cache.py); the model advances the cache's position.
Nothing here knows about optimizers, data files or tokenizers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache, Slots
from .config import ModelConfig
from .layers import Expert, RMSNorm, linear, rope_cache, yarn_mscale, yarn_rope_cache
from .mla import GQA, MLA
from .moe import MoE
from .mtp import MTPLayer

IGNORE_INDEX = -100  # a target that is not scored (padding)
COMPILE_NEEDS_KERNELS = ("compile=True runs the decoding step through dsv3.kernels (kernels/decode.py), which are "
                         "switched off (kernels.disabled(), DSV3_KERNELS=0 or --no-kernels): decode without compile, "
                         "or turn the kernels on")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, vocab_size); None when called with return_logits=False
    loss: torch.Tensor | None = None  # ce_loss + aux_loss + z_loss
    ce_loss: torch.Tensor | None = None  # next-token cross-entropy (nats per token)
    aux_loss: torch.Tensor | None = None  # aux_loss_coef * mean balance loss over MoE layers
    z_loss: torch.Tensor | None = None  # z_loss_coef * mean router z-loss over MoE layers
    mtp_loss: torch.Tensor | None = None  # mtp_loss_weight / D * sum of the MTP depths' CE (0 without MTP)
    hidden: torch.Tensor | None = None  # (B, T, dim) the last hidden state after the final norm (depth 1's input)


class Block(nn.Module):
    """One transformer layer: attention and feed-forward, each a pre-norm residual branch."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg) if cfg.attn == "mla" else GQA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else Expert(cfg.dim, cfg.dense_inter_dim)

    def forward(self, x, cos, sin, cache=None, mask=None, losses=True):
        """-> (x, balance loss, z-loss); the losses are None for a dense layer or when losses=False."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id, mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, balance, z = self.ffn(h, losses)
            return x + y, balance, z
        return x + self.ffn(h), None, None


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq_len, rope dims / 2): plain RoPE, or YaRN's when cfg.yarn_factor > 1."""
    rope_dim = cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.head_dim
    if cfg.yarn_factor == 1:
        return rope_cache(rope_dim, cfg.max_seq_len, cfg.rope_theta)
    attn_factor = yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale) / yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
    return yarn_rope_cache(rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg.yarn_factor, cfg.yarn_original_max_seq_len,
                           cfg.yarn_beta_fast, cfg.yarn_beta_slow, attn_factor)


@kernels.fast_path(kernels.model_embed_tokens)
def embed_tokens(model: DeepSeekV3, tokens: torch.Tensor) -> torch.Tensor:
    """The token embedding lookup (B, T) -> (B, T, dim)."""
    return model.embed(tokens)


@kernels.fast_path(kernels.model_head_loss)
def head_loss(model: DeepSeekV3, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the output head's logits h W^T (B, T, vocab), in fp32; targets equal to
    IGNORE_INDEX are not scored."""
    logits = model.head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX)


def static_step(module: nn.Module, inputs: tuple, slots: Slots, mask: torch.Tensor) -> torch.Tensor:
    """module(*inputs, slots, mask, losses=False)[0]: a Block (inputs x, cos, sin) or an MTPLayer (h, emb, cos,
    sin) over T new positions against one layer of the cache (`KVCache.slots`). The body of the decoding step,
    eager or compiled (kernels/decode.py): the blocks' own forward, no copy of it."""
    return module(*inputs, slots, mask, losses=False)[0]


class DeepSeekV3(nn.Module):
    """Token embedding, n_layers Blocks, a final RMSNorm and the output head (tied to the embedding by default)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # multi-token prediction (DeepSeek-V3 §2.2): depth k's block is layer k - 1 of its own cache, and MoE even
        # where the trunk's first layers are dense (as in DeepSeek-V3, whose MTP layer is an MoE layer)
        self.mtp = nn.ModuleList(MTPLayer(cfg, Block(k, cfg.replace(n_dense_layers=0)))
                                 for k in range(cfg.n_mtp_layers)) if cfg.n_mtp_layers else None
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs (wo, w2) scaled by 1/sqrt(2 n_layers) as in GPT-2."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                residual = name.endswith(("wo.weight", "w2.weight", ".w2"))
                nn.init.normal_(p, mean=0.0, std=resid_std if residual else std)
        for m in self.moe_layers(mtp=True):
            m.gate.bias.zero_()

    # --- helpers the trainer, generator and plots use ---
    def moe_layers(self, mtp: bool = False) -> list[MoE]:
        """The trunk's MoE layers; mtp=True: then the MTP blocks' too."""
        blocks = list(self.layers) + ([m.block for m in self.mtp] if mtp and self.mtp is not None else [])
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def expert_loads(self) -> torch.Tensor:
        """(n_moe_layers, n_routed_experts) routed-slot counts of the last forward."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.last_load for m in layers]).cpu()

    def compile_blocks(self) -> None:
        """torch.compile each Block in place (regional compilation). The blocks run the same code, so they share
        one compiled graph where a whole-model compile traces every layer. Parameter names are unchanged, so
        checkpoints do not notice. The embedding and the output head (and its loss) stay eager."""
        for block in [*self.layers, *(m.block for m in self.mtp or [])]:  # MTP blocks: T - k positions
            block.compile()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: KVCache, *, compiled: bool = False) -> ModelOutput:
        """forward(tokens, cache=cache) for T new positions per row, tokens (B, T), with static shapes: the
        positions are a tensor and every block attends over the whole preallocated cache under a mask (`Slots`),
        so with compiled=True one torch.compile'd graph serves every position and every block (kernels/decode.py).
        Plain decoding runs T = 1, speculative verification T = 1 + drafts. The cache advances by T.
        -> logits (B, T, vocab) and hidden (B, T, dim), after the final norm. No gradients, no router losses."""
        if compiled:
            if not kernels.enabled():
                raise ValueError(COMPILE_NEEDS_KERNELS)
            from .kernels.decode import compiled_head, compiled_step, graphs_allowed

            device = tokens.device.type
            step, head, graphs = compiled_step(static_step, device), compiled_head(device), graphs_allowed()
        else:
            step, head, graphs = static_step, linear, contextlib.nullcontext()
        T = tokens.shape[1]
        pos = torch.arange(cache.pos, cache.pos + T, device=self.rope_cos.device)
        cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)
        mask = cache.mask(T, whole_cache=True)  # the slots written so far, minus padding
        x = self.embed(tokens)
        with graphs:
            for block in self.layers:
                x = step(block, (x, cos, sin), cache.slots(block.layer_id, pos), mask)
            h = self.norm(x)
            logits = head(h, self.head.weight)
        cache.pos += T
        return ModelOutput(logits=logits, hidden=h)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: KVCache, *, compiled: bool = False) -> torch.Tensor:
        """Logits (B, vocab) of one new position per row, tokens (B, 1), against an absorbed MLA cache, which
        advances by one: `decode` with T = 1."""
        if self.cfg.attn != "mla" or not cache.absorb:
            raise ValueError("decode_step needs an MLA model and an absorbed cache (new_cache(..., absorb=True))")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"decode_step takes tokens of shape (batch, 1), got {getattr(tokens, 'shape', tokens)}")
        check_inputs(self.cfg, tokens, None, cache)
        return self.decode(tokens, cache, compiled=compiled).logits[:, -1]

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing: apply each gate's bias update (call once per optimizer step)."""
        for m in self.moe_layers(mtp=True):
            m.gate.update_bias()

    def new_cache(self, batch: int, max_len: int | None = None, *, absorb: bool = True,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, absorb=absorb,
                       device=p.device, dtype=dtype or p.dtype)

    # --- forward ---
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, *, return_logits: bool = True, last_logits: bool = False) -> ModelOutput:
        """tokens (B, T) -> logits (B, T, vocab); with targets (B, T), also the losses.
        return_logits=False (with targets): only the losses, for training; `logits` is None, and the kernels
        never build the (B, T, vocab) logits at all. last_logits=True (without targets): only the last
        position's logits, (B, 1, vocab), which is all that decoding needs."""
        check_inputs(self.cfg, tokens, targets, cache)
        if last_logits and targets is not None:
            raise ValueError("last_logits=True is for decoding; it cannot be combined with targets")
        T = tokens.shape[1]
        start = cache.pos if cache is not None else 0
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = cache.mask(T) if cache is not None else None
        x = emb = embed_tokens(self, tokens)
        balances, zs = [], []
        for block in self.layers:
            x, balance, z = block(x, cos, sin, cache, mask, losses=targets is not None)
            if balance is not None:
                balances.append(balance)
                zs.append(z)
        if cache is not None:
            cache.pos += T
        h = self.norm(x)
        if targets is None:
            return ModelOutput(logits=self.head(h[:, -1:] if last_logits else h), hidden=h)
        if return_logits:
            logits = self.head(h)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX)
        else:
            logits, ce = None, head_loss(self, h, targets)
        zero = ce.new_zeros(())
        mtp = self._mtp_loss(h, emb, targets, cos, sin, balances, zs) if self.mtp is not None else zero
        aux = self.cfg.aux_loss_coef * torch.stack(balances).mean() if balances else zero
        z = self.cfg.z_loss_coef * torch.stack(zs).mean() if zs else zero
        return ModelOutput(logits=logits, loss=ce + aux + z + mtp, ce_loss=ce, aux_loss=aux, z_loss=z, mtp_loss=mtp,
                           hidden=h)

    def _mtp_loss(self, h, emb, targets, cos, sin, balances, zs) -> torch.Tensor:
        """lambda / D * sum_k L_MTP^k (DeepSeek-V3 eq. 24-25). Depth k at position i reads h_i^{k-1} and Emb(t_{i+k})
        and is scored on t_{i+k+1} = targets[i + k], for i = 0 .. T-k-1: nothing past the sequence's end. L^k is
        the mean over those positions (the paper divides by T). The MTP blocks' router losses join `balances`."""
        T, losses = targets.shape[1], []
        for k, layer in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            h, balance, z = layer(h[:, :T - k], emb[:, k:], cos[:T - k], sin[:T - k])
            losses.append(head_loss(self, h, targets[:, k:]))
            if balance is not None:
                balances.append(balance)
                zs.append(z)
        total = torch.stack(losses).sum() if losses else h.new_zeros((), dtype=torch.float32)
        return self.cfg.mtp_loss_weight / len(self.mtp) * total

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """Mean CE of head(h) (B, T, dim) against targets (B, T); fused=False: always the plain logits path."""
        return head_loss(self, h, targets) if fused else head_loss.reference(self, h, targets)


# --- around the model: input checks and parameter counts ---

def check_inputs(cfg: ModelConfig, tokens, targets, cache: KVCache | None) -> None:
    """One clear ValueError for inputs the model cannot take: not a (batch, seq_len) tensor of token ids in
    [0, vocab_size), longer than max_seq_len or the cache's free space, or targets of another shape or range."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must have dtype torch.long (or int32), got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must have shape (batch, seq_len) with both >= 1, got {tuple(tokens.shape)}")
    T = tokens.shape[1]
    limit = cfg.max_seq_len if cache is None else cache.max_len - cache.pos
    if T > limit:
        where = f"max_seq_len={cfg.max_seq_len}" if cache is None else \
            f"the cache's free space ({cache.max_len} - {cache.pos} = {limit})"
        raise ValueError(f"sequence length {T} exceeds {where}")
    if cache is not None and tokens.shape[0] != cache.batch:
        raise ValueError(f"tokens batch {tokens.shape[0]} does not match the cache batch {cache.batch}")
    if tokens.device.type != "cpu":  # an accelerator: check on the device, no host sync per step
        torch._assert_async(((tokens >= 0) & (tokens < cfg.vocab_size)).all(),
                            f"token ids must be in [0, vocab_size={cfg.vocab_size})")
    elif not torch.compiler.is_compiling():
        lo, hi = tokens.min().item(), tokens.max().item()
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={cfg.vocab_size}), got min {lo}, max {hi}")
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor shaped like tokens {tuple(tokens.shape)}, got {got}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must have dtype torch.long, got {targets.dtype}")
        if not torch.compiler.is_compiling():  # one host sync: the error names the first bad position
            bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= cfg.vocab_size))
            if bad.any():
                b, t = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"targets[{b}, {t}] = {int(targets[b, t])} is not a token id in "
                                 f"[0, vocab_size={cfg.vocab_size}) nor the ignore value {IGNORE_INDEX}")


def count_params(model: DeepSeekV3) -> dict[str, int]:
    """Parameter counts: total (tied weights once) and active per token, with a breakdown.

    Active = total minus the routed experts a token does not use ((N_r - K_r) per MoE layer).
    The embedding counts once: with tied weights it is the output head every token runs.
    With MTP modules (their embedding and head are the main model's): "mtp" and "mtp_active" count their own
    parameters, part of total and active (training runs them), and "inference_total" / "inference_active" count
    what decoding without speculation uses (total and active minus the MTP modules').
    """
    cfg = model.cfg
    role: dict[int, str] = {}  # id(parameter) -> its part; a tied weight counts once, with the first role given

    def claim(module: nn.Module | None, part: str) -> None:
        for p in module.parameters() if module is not None else ():
            role.setdefault(id(p), part)

    claim(model.mtp, "mtp")
    claim(model.embed, "embedding")
    claim(model.head, "head")
    for block in model.layers:
        claim(block.attn, "attention")
        if isinstance(block.ffn, MoE):
            claim(block.ffn.experts, "routed_experts")
            claim(block.ffn.shared_experts, "shared_experts")
            claim(block.ffn.gate, "router")
        else:
            claim(block.ffn, "dense_mlp")
    claim(model, "norms")  # what is left: the blocks' and the final RMSNorm weights
    parts = dict.fromkeys(("embedding", "attention", "routed_experts", "shared_experts", "dense_mlp", "router",
                           "norms", "head", "mtp"), 0)
    for p in model.parameters():  # each tensor once
        parts[role[id(p)]] += p.numel()
    mtp = parts.pop("mtp")
    total = sum(parts.values()) + mtp
    unused = (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim  # per MoE layer
    counts = {"total": total, "active": total - len(model.moe_layers()) * unused, **parts}
    if model.mtp is not None:
        mtp_active = mtp - (len(model.moe_layers(mtp=True)) - len(model.moe_layers())) * unused
        counts["active"] -= mtp - mtp_active
        counts.update(mtp=mtp, mtp_active=mtp_active, inference_total=total - mtp,
                      inference_active=counts["active"] - mtp_active)
    return counts
