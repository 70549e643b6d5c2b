"""Model configuration: one dataclass and the named presets.

Holds `ModelConfig` (every architectural number, with a comment each) and `PRESETS`.
`ModelConfig.preset(name, **overrides)` is the one way to get a config; invalid values raise a
`ValueError` (`SettingError`) naming the field and its allowed range. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, fields


class SettingError(ValueError):
    """A bad setting. The message names the field (`steps must be ...`); `named(flag)` renames the fields, e.g.
    to the command-line flags that set them (`--steps must be ...`)."""

    def __init__(self, msg: str, names: tuple[str, ...] = ()):
        super().__init__(msg)
        self.names = names or (msg.split()[0],)  # the fields the message is about (default: its first word)

    def named(self, flag) -> str:
        """The message with each field name replaced by flag(name) (names flag() maps to None stay)."""
        msg = str(self)
        for name in self.names:
            if flag(name):
                msg = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag(name), msg)
        return msg


# The ModelConfig fields that the command line sets with flags of their own (`info --mtp-layers`, `train
# --mtp-layers / --mtp-weight`; every other field: train's --set FIELD=VALUE): the map SettingError.named needs so that
# an error about one of them names the flag the user typed (argparse's dest, mtp_layers, is not the field's name).
FIELD_FLAGS = {"n_mtp_layers": "--mtp-layers", "mtp_loss_weight": "--mtp-weight"}


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise SettingError(msg)


@dataclass(frozen=True)
class ModelConfig:
    # --- vocabulary and trunk ---
    vocab_size: int = 50257  # GPT-2 BPE (tiktoken r50k_base); <|endoftext|> = 50256
    dim: int = 576  # residual stream width (d in the papers)
    n_layers: int = 30  # transformer blocks
    n_heads: int = 9  # attention heads (n_h)
    attn: str = "mla"  # "mla" (Multi-Head Latent Attention) or "gqa" (dense baseline)
    # --- MLA (DeepSeek-V2 §2.1) ---
    q_lora_rank: int = 0  # d'_c: query compression rank; 0 = plain query projection
    kv_lora_rank: int = 512  # d_c: width of the cached latent c_kv
    qk_nope_head_dim: int = 64  # d_h: per-head query/key part without RoPE
    qk_rope_head_dim: int = 64  # d^R_h: decoupled RoPE part; one shared key k_pe per token
    v_head_dim: int = 64  # per-head value width
    # --- GQA baseline (attn="gqa") ---
    n_kv_heads: int = 3  # key/value heads shared by n_heads // n_kv_heads query heads
    head_dim: int = 64  # per-head width of q, k and v
    # --- feed-forward ---
    ffn: str = "moe"  # "moe" (DeepSeekMoE) or "dense" (SwiGLU MLP in every layer)
    n_dense_layers: int = 0  # the first k layers use a dense SwiGLU MLP even when ffn="moe"
    dense_inter_dim: int = 1536  # hidden width of the dense SwiGLU MLP
    # --- DeepSeekMoE (DeepSeek-V3 §2.1.2) ---
    n_routed_experts: int = 8  # N_r
    n_shared_experts: int = 1  # N_s, always active
    n_activated_experts: int = 2  # K_r: top-k routed experts per token
    moe_inter_dim: int = 184  # hidden width of each expert's SwiGLU
    n_expert_groups: int = 1  # group-limited routing: experts are split into this many groups
    n_limited_groups: int = 1  # ... and each token picks its top-k among this many groups
    score_func: str = "softmax"  # router affinity: "softmax" (V2) or "sigmoid" (V3)
    group_score: str = "top2"  # a group's rank: "top2" = sum of its two best biased scores (V3), "max" = its best (V2)
    norm_topk_prob: bool | None = None  # renormalise top-k gates; None = True for sigmoid, False for softmax
    route_scale: float = 1.0  # gates are multiplied by this (routed_scaling_factor)
    aux_loss_coef: float = 1e-3  # alpha of the expert-balance loss (0 = off)
    z_loss_coef: float = 1e-3  # coefficient of the router z-loss (0 = off)
    bias_update_speed: float = 0.0  # gamma of aux-loss-free balancing (0 = off)
    # --- positions, norms, init ---
    max_seq_len: int = 1024  # longest sequence (RoPE table and cache length)
    rope_theta: float = 10000.0  # RoPE base frequency
    # YaRN context extension (Peng et al. 2023; DeepSeek-V2 §3.1): yarn_factor 1 = plain RoPE
    yarn_factor: float = 1.0  # s: the context is stretched s times past yarn_original_max_seq_len
    yarn_original_max_seq_len: int = 4096  # the pretraining context the frequencies were fitted to
    yarn_beta_fast: float = 32.0  # dims rotating more than this many times in that context keep their frequency
    yarn_beta_slow: float = 1.0  # dims rotating fewer times are fully interpolated (divided by s)
    yarn_mscale: float = 1.0  # the rope tables are scaled by mscale(s, yarn_mscale) / mscale(s, yarn_mscale_all_dim)
    yarn_mscale_all_dim: float = 0.0  # and the softmax scale by mscale(s, yarn_mscale_all_dim)^2 (0 = not)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    latent_norm_eps: float | None = None  # epsilon of MLA's latent norms (c_kv, c_q); None = norm_eps (DeepSeek: 1e-6)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    init_std: float = 0.02  # std of the normal init; residual outputs use init_std / sqrt(2 * n_layers)
    # --- multi-token prediction (DeepSeek-V3 §2.2) ---
    n_mtp_layers: int = 0  # D: MTP modules, depth k predicts the token k + 1 ahead (0 = off)
    mtp_loss_weight: float = 0.3  # lambda: loss = ... + lambda / D * (sum of the depths' cross-entropies)

    def __post_init__(self):
        """Invalid values raise a SettingError naming the first bad field, checked in the order of the class."""
        self._check_trunk()
        self._check_attention()
        self._check_ffn()
        if self.has_moe:
            self._check_moe()
        self._check_positions()

    def _check_trunk(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                _need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be an int, got {v!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            _need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _need(self.attn in ("mla", "gqa"), f"attn must be 'mla' or 'gqa', got {self.attn!r}")
        _need(self.ffn in ("moe", "dense"), f"ffn must be 'moe' or 'dense', got {self.ffn!r}")

    def _check_attention(self):
        if self.attn == "mla":
            _need(self.q_lora_rank >= 0, f"q_lora_rank must be >= 0, got {self.q_lora_rank}")
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                _need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
            _need(self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
                  f"qk_rope_head_dim must be even and >= 2, got {self.qk_rope_head_dim}")
        else:
            _need(self.n_kv_heads >= 1, f"n_kv_heads must be >= 1, got {self.n_kv_heads}")
            _need(self.n_heads % self.n_kv_heads == 0,
                  f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
            _need(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim must be even and >= 2, got {self.head_dim}")

    def _check_ffn(self):
        _need(0 <= self.n_dense_layers <= self.n_layers, f"n_dense_layers must be in [0, n_layers={self.n_layers}]")
        if self.ffn == "dense" or self.n_dense_layers > 0:
            _need(self.dense_inter_dim >= 1, f"dense_inter_dim must be >= 1, got {self.dense_inter_dim}")

    def _check_moe(self):
        _need(self.n_routed_experts >= 1, f"n_routed_experts must be >= 1, got {self.n_routed_experts}")
        _need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _need(self.moe_inter_dim >= 1, f"moe_inter_dim must be >= 1, got {self.moe_inter_dim}")
        _need(1 <= self.n_activated_experts <= self.n_routed_experts,
              f"n_activated_experts (top-k) must be in [1, n_routed_experts={self.n_routed_experts}], "
              f"got {self.n_activated_experts}")
        _need(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0,
              f"n_expert_groups ({self.n_expert_groups}) must divide n_routed_experts ({self.n_routed_experts})")
        _need(1 <= self.n_limited_groups <= self.n_expert_groups,
              f"n_limited_groups must be in [1, n_expert_groups={self.n_expert_groups}], got {self.n_limited_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        _need(self.n_limited_groups * per_group >= self.n_activated_experts,
              f"n_limited_groups * experts per group ({self.n_limited_groups * per_group}) must be >= "
              f"n_activated_experts ({self.n_activated_experts})")
        _need(self.score_func in ("softmax", "sigmoid"),
              f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        _need(self.group_score in ("top2", "max"), f"group_score must be 'top2' or 'max', got {self.group_score!r}")
        _need(self.route_scale > 0, f"route_scale must be > 0, got {self.route_scale}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_speed"):
            _need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")

    def _check_positions(self):  # and the norms, the init and multi-token prediction
        _need(self.n_mtp_layers >= 0, f"n_mtp_layers must be >= 0, got {self.n_mtp_layers}")
        _need(self.mtp_loss_weight >= 0, f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
        _need(self.rope_theta > 0 and self.norm_eps > 0 and self.init_std > 0,
              "rope_theta, norm_eps and init_std must be > 0")
        _need(self.latent_norm_eps is None or self.latent_norm_eps > 0,
              f"latent_norm_eps must be None or > 0, got {self.latent_norm_eps}")
        _need(self.yarn_factor >= 1, f"yarn_factor must be >= 1 (1 = plain RoPE), got {self.yarn_factor}")
        if self.yarn_factor > 1:
            _need(self.yarn_original_max_seq_len >= 1,
                  f"yarn_original_max_seq_len must be >= 1, got {self.yarn_original_max_seq_len}")
            _need(self.yarn_beta_fast > 0 and self.yarn_beta_slow > 0, "yarn_beta_fast and yarn_beta_slow must be > 0")

    # --- derived values ---
    @property
    def has_moe(self) -> bool:
        return self.ffn == "moe" and self.n_dense_layers < self.n_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def topk_norm(self) -> bool:
        """Whether the top-k gates are renormalised to sum to 1 (before route_scale)."""
        if self.norm_topk_prob is None:
            return self.score_func == "sigmoid"
        return self.norm_topk_prob

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.ffn == "moe" and layer_id >= self.n_dense_layers

    @property
    def cache_values_per_token(self) -> int:
        """Values cached per token per layer: the latent (c_kv, k_pe) for MLA, K and V for GQA."""
        if self.attn == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    def sections(self) -> dict[str, dict]:
        """The fields that apply to this config, grouped as in the class (e.g. no GQA fields on an MLA model)."""
        names = {f.name for f in fields(self)}
        groups = {
            "trunk": ["vocab_size", "dim", "n_layers", "n_heads", "attn"],
            "attention (MLA)": ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                "latent_norm_eps"] if self.attn == "mla" else [],
            "attention (GQA)": ["n_kv_heads", "head_dim"] if self.attn == "gqa" else [],
            "feed-forward": ["ffn", *(["n_dense_layers"] if self.ffn == "moe" else []),
                             *(["dense_inter_dim"] if self.ffn == "dense" or self.n_dense_layers > 0 else [])],
            "DeepSeekMoE": ["n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim",
                            "n_expert_groups",
                            *(["n_limited_groups", "group_score"] if self.n_expert_groups > 1 else []),
                            "score_func", "norm_topk_prob", "route_scale", "aux_loss_coef", "z_loss_coef",
                            "bias_update_speed"] if self.has_moe else [],
            "positions, norms, init": ["max_seq_len", "rope_theta", "yarn_factor",
                                       *([f.name for f in fields(self) if f.name.startswith("yarn_") and
                                          f.name != "yarn_factor"] if self.yarn_factor != 1 else []),
                                       "norm_eps", "tie_embeddings", "init_std"],
            "multi-token prediction": ["n_mtp_layers", *(["mtp_loss_weight"] if self.n_mtp_layers else [])],
        }
        assert {n for g in groups.values() for n in g} <= names
        return {title: {n: getattr(self, n) for n in group} for title, group in groups.items() if group}

    # --- construction and serialisation ---
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown model config field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **overrides) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, dict] = {
    # The seed's model: MLA (kv_lora_rank 512, no query compression) + DeepSeekMoE (1 shared + 8 routed,
    # top-2) in all 30 layers. moe_inter_dim 184 (a multiple of 8, for bf16 tensor cores) puts the total
    # at 172,491,648 parameters, 0.87% under 174M; 115,260,288 are active per token.
    "174m": dict(),
    # A CPU preset with the same architecture: small trunk, same GPT-2 vocabulary. Its balance loss is
    # 10x the 174m's, to pull the routed load toward uniform within a few hundred CPU steps (the
    # aux-loss-free bias steers more directly, but a softmax router's bias has no slot in the HF export).
    "tiny": dict(
        aux_loss_coef=1e-2,
        dim=128,
        n_layers=4,
        n_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        moe_inter_dim=128,
        dense_inter_dim=512,
        max_seq_len=256,
    ),
    # The seed's baseline, SmolLM2-135M's shape (dense LLaMA: GQA 9 query / 3 KV heads, SwiGLU 1536),
    # with the GPT-2 vocabulary instead of SmolLM2's own 49,152 tokens.
    "smollm2-135m": dict(attn="gqa", ffn="dense", n_kv_heads=3, head_dim=64, dense_inter_dim=1536, rope_theta=100000.0),
}
