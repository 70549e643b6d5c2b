"""Import from Hugging Face transformers: `from_hf(path)` reads a DeepSeek-V2 / DeepSeek-V3 model folder (or a Llama
one, the dense GQA baseline) into a `DeepSeekV3`; `hf_model_config(path)` maps its config.json alone (what
`python -m dsv3 info --hf PATH` prints). The inverse of `export_hf`: the tensor names and the rewrites they undo
(RoPE layout, per-expert matrices, the latent rescale) are `dsv3/names.py`, the one map both use. Besides:

  FP8          -- float8_e4m3fn weights with one `weight_scale_inv` per block (quantization_config.weight_block_size,
                  DeepSeek-V3's 128 x 128) are dequantised, w * scale in fp32, then cast to the requested dtype.
  latent norms -- transformers (like DeepSeek's own code) gives kv_a_layernorm / q_a_layernorm eps 1e-6 whatever
                  rms_norm_eps says: imported as `latent_norm_eps`. A folder written by `export_hf` carries dsv3's own
                  config (`dsv3_config` in config.json) and its rescaled latent rows one precision wider, so the
                  rescale is undone exactly and the round trip gives back the same state dict, bit for bit.

Every config field either maps onto `ModelConfig`, is checked to be a value we compute exactly, or is known not to
change the forward pass (`IGNORED`); anything else is refused with a ValueError naming it, as is every tensor the
config does not explain and every tensor it needs that is missing. Multi-token-prediction layers
(model.layers.{n_layers + k}.*) go to `load_mtp`. Loading builds the model without memory (meta device), then reads
the shards one tensor at a time into the parameters: never two copies of the weights.
The folder's tokenizer.json (the `tokenizers` package) becomes `model.tokenizer` for `dsv3.generate`.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch

from .config import ModelConfig
from .layers import yarn_mscale
from .model import DeepSeekV3, rope_tables
from .names import HF_LATENT_NORM_EPS, hf_weights, latent_scale

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "llama")
# config.json fields that do not change the forward pass: bookkeeping, training-only, serving hints, token ids,
# fields transformers derives from others, and those read elsewhere (quantization_config, the MTP count, dsv3_config)
IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "use_cache", "dtype",
    "torch_dtype", "initializer_range", "attention_dropout", "aux_loss_alpha", "seq_aux", "output_router_logits",
    "router_aux_loss_coef", "ep_size", "pretraining_tp", "bos_token_id", "eos_token_id", "pad_token_id", "qk_head_dim",
    "num_nextn_predict_layers", "num_mtp_layers", "quantization_config", "dsv3_config",
}
TRAINING_ONLY = ("aux_loss_coef", "z_loss_coef", "bias_update_speed", "init_std", "mtp_loss_weight")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFConfig:
    """A folder's config.json mapped onto ModelConfig, with what the weights loader needs besides."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        f = self.path / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{self.path}: no config.json (expected a transformers model folder)")
        self.hf = json.loads(f.read_text())
        self.model_type = self.hf.get("model_type")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"{f}: model_type={self.model_type!r} is not supported (one of {', '.join(MODEL_TYPES)})")
        self.used = set(IGNORED)
        self.interleaved = False  # rope rows stored as adjacent pairs
        cfg = self._llama() if self.model_type == "llama" else self._deepseek()
        unknown = sorted(set(self.hf) - self.used)
        if unknown:
            raise ValueError(f"{f}: unknown config field(s) {', '.join(unknown)}: dsv3 cannot tell whether they change "
                             "the model (remove them if they do not)")
        self.n_mtp = self.hf.get("num_nextn_predict_layers", self.hf.get("num_mtp_layers", 0)) or 0
        self.fp8_block = self._fp8()
        self.dtype = _DTYPES.get(self.hf.get("dtype") or self.hf.get("torch_dtype") or "float32", torch.float32)
        self.latent_scale = 1.0  # export_hf's rescale of the latent rows, undone on load
        self.provenance = "dsv3_config" in self.hf
        if self.provenance:
            cfg = self._dsv3(cfg)
        self.cfg = cfg

    # --- field access: every field read is marked as used ---
    def get(self, key, default=None):
        self.used.add(key)
        return self.hf.get(key, default)

    def need(self, key):
        self.used.add(key)
        if self.hf.get(key) is None:
            raise ValueError(f"{self.path / 'config.json'}: {key} is missing")
        return self.hf[key]

    def refuse(self, key, why: str):
        raise ValueError(f"{self.path / 'config.json'}: {key}={self.hf.get(key)!r} is not supported: {why}")

    def expect(self, key, allowed: tuple, why: str):
        if self.get(key, allowed[0]) not in allowed:
            self.refuse(key, why)

    def _common(self) -> dict:
        self.expect("hidden_act", ("silu",), "dsv3's SwiGLU uses SiLU")
        self.expect("attention_bias", (False,), "dsv3's projections have no bias")
        self.expect("mlp_bias", (False,), "dsv3's projections have no bias")
        self.expect("partial_rotary_factor", (1.0, 1), "dsv3 rotates whole rope heads")
        tie = self.get("tie_word_embeddings", False)
        return dict(vocab_size=self.need("vocab_size"), dim=self.need("hidden_size"),
                    n_layers=self.need("num_hidden_layers"), n_heads=self.need("num_attention_heads"),
                    max_seq_len=self.need("max_position_embeddings"), norm_eps=float(self.get("rms_norm_eps", 1e-6)),
                    tie_embeddings=bool(tie), init_std=float(self.get("initializer_range", 0.02)))

    def _rope(self) -> dict:
        """rope_theta and YaRN from rope_parameters (transformers 5) or rope_scaling + rope_theta (older files)."""
        given, old, top = self.get("rope_parameters"), self.get("rope_scaling"), self.get("rope_theta")
        rope = dict(given or old or {})
        theta = float(rope.pop("rope_theta", None) or top or 10000.0)
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if kind == "default":
            return dict(rope_theta=theta)
        if kind != "yarn":
            raise ValueError(f"{self.path / 'config.json'}: rope type {kind!r} is not supported (default or yarn)")
        if rope.pop("attention_factor", None) is not None:
            raise ValueError(f"{self.path / 'config.json'}: rope attention_factor is not supported "
                             "(dsv3 derives it from mscale)")
        if rope.pop("truncate", True) is not True:
            raise ValueError(f"{self.path / 'config.json'}: rope truncate=False is not supported")
        orig = rope.pop("original_max_position_embeddings", None) or self.get("original_max_position_embeddings")
        if orig is None:
            raise ValueError(f"{self.path / 'config.json'}: YaRN needs original_max_position_embeddings")
        factor = rope.pop("factor", None) or self.need("max_position_embeddings") / orig
        ms, ma = rope.pop("mscale", None), rope.pop("mscale_all_dim", None)
        beta_fast, beta_slow = rope.pop("beta_fast", None) or 32.0, rope.pop("beta_slow", None) or 1.0
        if rope:
            raise ValueError(f"{self.path / 'config.json'}: unknown rope parameter(s) {', '.join(sorted(rope))}")
        # transformers scales cos/sin by mscale(s, mscale) / mscale(s, mscale_all_dim) only when both are set, else by
        # mscale(s); DeepSeek's reference code by the ratio with defaults 1 and 0: refuse where the two disagree
        hf_factor = yarn_mscale(factor, ms) / yarn_mscale(factor, ma) if ms and ma else yarn_mscale(factor)
        ms, ma = 1.0 if ms is None else float(ms), float(ma or 0.0)
        if hf_factor != yarn_mscale(factor, ms) / yarn_mscale(factor, ma):
            raise ValueError(f"{self.path / 'config.json'}: rope mscale={ms}, mscale_all_dim={ma}: transformers and "
                             "DeepSeek's reference code scale attention differently for these values")
        return dict(rope_theta=theta, yarn_factor=float(factor), yarn_original_max_seq_len=int(orig),
                    yarn_beta_fast=float(beta_fast), yarn_beta_slow=float(beta_slow), yarn_mscale=ms,
                    yarn_mscale_all_dim=ma)

    def _llama(self) -> ModelConfig:
        c = self._common()
        heads = c["n_heads"]
        rope = self._rope()
        if "yarn_factor" in rope:
            raise ValueError(f"{self.path / 'config.json'}: YaRN is imported for DeepSeek models only")
        return ModelConfig(**c, **rope, attn="gqa", ffn="dense", n_kv_heads=self.get("num_key_value_heads") or heads,
                           head_dim=self.get("head_dim") or c["dim"] // heads,
                           dense_inter_dim=self.need("intermediate_size"))

    def _deepseek(self) -> ModelConfig:
        v3 = self.model_type == "deepseek_v3"
        c = self._common()
        n_layers = c["n_layers"]
        if (self.get("num_key_value_heads") or c["n_heads"]) != c["n_heads"]:
            self.refuse("num_key_value_heads", "MLA has one key/value head per query head")
        self.get("head_dim")  # transformers sets it to qk_rope_head_dim
        self.interleaved = bool(self.get("rope_interleave", True)) if v3 else True
        mla = dict(q_lora_rank=self.get("q_lora_rank") or 0, kv_lora_rank=self.need("kv_lora_rank"),
                   qk_nope_head_dim=self.need("qk_nope_head_dim"), qk_rope_head_dim=self.need("qk_rope_head_dim"),
                   v_head_dim=self.need("v_head_dim"), dense_inter_dim=self.need("intermediate_size"))
        n_routed = self.get("n_routed_experts")
        first_dense = self.get("first_k_dense_replace") or 0
        self.expect("moe_layer_freq", (1,), "every layer after first_k_dense_replace is MoE in transformers")
        if c["norm_eps"] != HF_LATENT_NORM_EPS:
            mla["latent_norm_eps"] = HF_LATENT_NORM_EPS
        if not n_routed or first_dense >= n_layers:  # no MoE layer
            for k in ("n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor",
                      "n_group", "topk_group", "topk_method", "norm_topk_prob", "scoring_func"):
                self.get(k)
            return ModelConfig(**c, **self._rope(), **mla, attn="mla", ffn="dense")
        moe = dict(n_routed_experts=n_routed, n_shared_experts=self.get("n_shared_experts") or 0,
                   n_activated_experts=self.need("num_experts_per_tok"),
                   moe_inter_dim=self.need("moe_intermediate_size"), n_dense_layers=first_dense,
                   route_scale=float(self.get("routed_scaling_factor", 2.5 if v3 else 1.0)))
        groups = self.get("n_group") or 1, self.get("topk_group") or 1
        if v3:  # transformers' DeepseekV3 always routes like this, whatever topk_method and scoring_func say
            self.expect("scoring_func", ("sigmoid",), "DeepseekV3 scores experts with a sigmoid")
            self.expect("topk_method", ("noaux_tc",), "DeepseekV3 routes with noaux_tc (group-limited, biased)")
            moe.update(score_func="sigmoid", norm_topk_prob=bool(self.get("norm_topk_prob", True)),
                       n_expert_groups=groups[0], n_limited_groups=groups[1], group_score="top2")
        else:
            self.expect("scoring_func", ("softmax",), "DeepseekV2 scores experts with a softmax")
            method = self.get("topk_method", "greedy")
            if method not in ("greedy", "group_limited_greedy"):
                self.refuse("topk_method", "DeepseekV2 routes with greedy or group_limited_greedy")
            if self.get("norm_topk_prob"):  # DeepSeek's code renormalises, transformers' DeepseekV2 does not
                self.refuse("norm_topk_prob", "transformers' DeepseekV2 ignores it while DeepSeek's code applies it")
            moe.update(score_func="softmax", norm_topk_prob=False, group_score="max")
            if method == "group_limited_greedy":
                moe.update(n_expert_groups=groups[0], n_limited_groups=groups[1])
        return ModelConfig(**c, **self._rope(), **mla, **moe, attn="mla", ffn="moe")

    def _fp8(self) -> tuple[int, int] | None:
        q = self.hf.get("quantization_config")
        if q is None:
            return None
        if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"{self.path / 'config.json'}: quantization_config {q} is not supported (fp8 e4m3 only)")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"{self.path / 'config.json'}: quantization_config activation_scheme="
                             f"{q.get('activation_scheme')!r} is not supported (dynamic: weights only)")
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"{self.path / 'config.json'}: quantization_config weight_block_size={block!r} "
                             "must be two positive ints")
        return block[0], block[1]

    def _dsv3(self, cfg: ModelConfig) -> ModelConfig:
        """The config dsv3's export wrote beside the transformers fields, if it still computes what they say."""
        try:
            ours = ModelConfig.from_dict(self.hf["dsv3_config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.path / 'config.json'}: dsv3_config is not a valid dsv3 config ({e})") from None
        a, b = _signature(cfg), _signature(ours)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"{self.path / 'config.json'}: dsv3_config disagrees with the transformers fields on "
                             f"{', '.join(diff)} (edited after export? remove dsv3_config to import the fields)")
        if ours.attn == "mla":
            self.latent_scale = latent_scale(ours)
        return ours


def _signature(cfg: ModelConfig) -> dict:
    """What a config computes, independent of how it is written (dense 'moe' layers, unused fields, defaults). The
    latent norms' eps is left out: export_hf expresses ours through rescaled rows that the import undoes."""
    d = cfg.to_dict()
    for k in (*TRAINING_ONLY, "n_mtp_layers", "latent_norm_eps", "norm_topk_prob", "ffn", "n_dense_layers",
              "n_expert_groups", "n_limited_groups", "group_score"):
        d.pop(k)
    d["moe_layers"] = [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
    if cfg.has_moe:
        noop = cfg.n_limited_groups == cfg.n_expert_groups or cfg.n_routed_experts == cfg.n_expert_groups
        d["groups"] = None if noop else (cfg.n_expert_groups, cfg.n_limited_groups, cfg.group_score)
        d["topk_norm"] = cfg.topk_norm
    else:
        for k in ("n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "score_func",
                  "route_scale"):
            d.pop(k)
    if cfg.yarn_factor == 1:
        for k in [k for k in d if k.startswith("yarn_")]:
            d.pop(k)
    gqa = ("n_kv_heads", "head_dim")
    for k in (gqa if cfg.attn == "mla" else ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                              "v_head_dim")):
        d.pop(k)
    if all(d["moe_layers"]):
        d.pop("dense_inter_dim")
    return d


def hf_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a transformers model folder, from its config.json alone (no weights needed)."""
    return HFConfig(path).cfg


# --- weights ---

def _weights(model: DeepSeekV3, hc: HFConfig) -> dict:
    """transformers name -> `dsv3.names.Weight` (our tensor, its shape in the file, the rewrite back to ours)."""
    return hf_weights(model, rope_pairs=hc.interleaved, latent_scale=hc.latent_scale,
                      router_bias=hc.model_type == "deepseek_v3")


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w (out, in) float8_e4m3fn times its per-block scale (ceil(out / b0), ceil(in / b1)), in fp32."""
    rows = scale_inv.float().repeat_interleave(block[0], 0)[: w.shape[0]]
    return w.float() * rows.repeat_interleave(block[1], 1)[:, : w.shape[1]]


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors weights are read: loading never unpickles code)")


_MTP = re.compile(r"model\.layers\.(\d+)\.")


def load_mtp(model: DeepSeekV3, names: list[str], read) -> None:
    """The multi-token-prediction tensors (DeepSeek-V3 §2.2; model.layers.{n_layers + k}.*) that the weight plan
    did not load. DeepSeek's checkpoints store each MTP layer's embedding and output head again
    (embed_tokens, shared_head.head); dsv3's MTP modules share the main model's, so those copies are checked
    against them. Without MTP modules (a config that cannot hold them) everything is reported and skipped.
    `read(name)` returns a tensor, dequantised."""
    shared = {"embed_tokens.weight": model.embed.weight, "shared_head.head.weight": model.head.weight}
    skipped = []
    for name in names:
        key = _MTP.sub("", name, count=1)
        if model.mtp is not None and key in shared:
            if not torch.equal(read(name).to(shared[key].dtype), shared[key].detach().cpu().to(shared[key].dtype)):
                warnings.warn(f"{name} differs from the main model's; dsv3's MTP modules use the main model's",
                              stacklevel=3)
        else:
            skipped.append(name)
    if skipped:
        kinds = sorted({re.sub(r"experts\.\d+\.", "experts.*.", n) for n in skipped})
        warnings.warn(f"skipped {len(skipped)} multi-token-prediction tensors (this model has no MTP module for "
                      f"them): {', '.join(kinds)}", stacklevel=3)


class _Shards:
    """The open safetensors files of a folder: which file holds each tensor, and each tensor read dequantised."""

    def __init__(self, path: Path, stack: ExitStack, fp8_block: tuple[int, int] | None):
        from safetensors import safe_open

        self.path, self.fp8_block, self.files = path, fp8_block, _shard_files(path)
        self.handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in self.files}
        self.where = {name: f for f, h in self.handles.items() for name in h.keys()}

    def info(self, name: str):
        return self.handles[self.where[name]].get_slice(name)

    def _tensor(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)

    def read(self, name: str) -> torch.Tensor:  # dequantised (`check` holds for MTP tensors too)
        w, scale = self._tensor(name), name + "_scale_inv"
        if scale in self.where and self.fp8_block is not None and w.dtype == torch.float8_e4m3fn:
            w = dequantize_fp8(w, self._tensor(scale), self.fp8_block)
        elif w.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"{self.path}: {name} is {w.dtype}, which dsv3 does not load")
        return w

    def check(self, plan: dict, mtp: list[str]) -> None:
        """Every tensor explained by the plan, the MTP layers or an FP8 scale; every planned one there, in its
        shape; FP8 weights exactly those with a scale and an fp8 quantization_config."""
        where, path = self.where, self.path
        scales = {n for n in where if n.endswith(".weight_scale_inv")}
        unknown = sorted(set(where) - plan.keys() - set(mtp) - scales)
        missing = sorted(plan.keys() - set(where))
        if unknown or missing:
            raise ValueError(f"{path}: the weights do not match config.json: " + "; ".join(
                f"{what} {len(ns)} tensor(s): {', '.join(ns[:8])}{' ...' if len(ns) > 8 else ''}"
                for what, ns in (("unknown", unknown), ("missing", missing)) if ns))
        for name, w in plan.items():
            info = self.info(name)
            got = tuple(info.get_shape())
            if got != w.shape:
                raise ValueError(f"{path}: {name} has shape {list(got)}, config.json implies {list(w.shape)}")
            kind = info.get_dtype()
            fp8 = kind.startswith("F8")
            if fp8 != (name + "_scale_inv" in where) or fp8 and (self.fp8_block is None or kind != "F8_E4M3"):
                raise ValueError(f"{path}: {name} is {kind}: only float8_e4m3fn weights have a "
                                 "weight_scale_inv, and they need both it and an fp8 quantization_config")
        orphans = sorted(s for s in scales if s.removesuffix("_scale_inv") not in where)
        if orphans:
            raise ValueError(f"{path}: unknown tensor(s) {', '.join(orphans[:8])} (a scale without its weight)")


def _dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    dtype = dtype or default
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    return dtype


def _materialize(model: DeepSeekV3, dtype: torch.dtype, device: torch.device) -> DeepSeekV3:
    """The meta-device model given real (uninitialised) memory, every tensor then overwritten by `_copy_weights`."""
    cfg = model.cfg
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gave the head a tensor of its own
        model.head.weight = model.embed.weight
    with torch.no_grad():
        for m in model.moe_layers(mtp=True):  # fp32 like transformers' e_score_correction_bias
            m.gate.bias = torch.zeros(cfg.n_routed_experts, device=device)
            m.gate.step_load.zero_()
            m.last_load.zero_()
        cos, sin = rope_tables(cfg)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    return model


@torch.no_grad()
def _copy_weights(plan: dict, shards: _Shards, device: torch.device) -> None:
    for f in shards.files:  # shard by shard, one tensor at a time: never two copies of the weights
        for name in shards.handles[f].keys():
            if name in plan:
                w = plan[name]
                x = shards.read(name)
                if w.ours.numel():
                    w.ours.copy_((w.from_hf(x) if w.from_hf is not None else x).to(device))


def from_hf(path: str | Path, *, dtype: torch.dtype | str | None = None,
            device: torch.device | str | None = None) -> DeepSeekV3:
    """A DeepSeekV3 holding the weights of a transformers model folder (config.json, then model.safetensors or
    model.safetensors.index.json and its shards; deepseek_v2, deepseek_v3 or llama), in eval mode.

    dtype: float32, bfloat16 or float16 (default: the folder's own `dtype`, float32 if it names none); FP8 weights
    are dequantised to it. device: where the weights go (default cpu). The routers' correction bias stays fp32, as
    transformers keeps it. model.tokenizer is the folder's tokenizer.json (None without one: use token ids with
    dsv3.generate_tokens), unless the folder is a dsv3 export with the GPT-2 vocabulary (then tiktoken's, as usual).
    Raises ValueError naming every unsupported config field, unknown tensor, missing tensor or wrong shape.
    """
    path = Path(path)
    hc = HFConfig(path)
    cfg, dtype, device = hc.cfg, _dtype(dtype, hc.dtype), torch.device(device or "cpu")
    with ExitStack() as stack:
        shards = _Shards(path, stack, hc.fp8_block)
        # DeepSeek's MTP layers (an MLA + MoE block each) load into dsv3's MTP modules when the files hold them
        if hc.n_mtp and cfg.attn == "mla" and cfg.has_moe and any(
                n.startswith(f"model.layers.{cfg.n_layers}.") for n in shards.where):
            cfg = cfg.replace(n_mtp_layers=hc.n_mtp)
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
        plan = _weights(model, hc)
        mtp = [n for n in shards.where if (m := _MTP.match(n)) and cfg.n_layers <= int(m.group(1)) <
               cfg.n_layers + hc.n_mtp and n not in plan]
        shards.check(plan, mtp)
        model = _materialize(model, dtype, device)
        _copy_weights(_weights(model, hc), shards, device)  # the same plan over the real tensors
        load_mtp(model, mtp, shards.read)
    model.eval()
    model.tokenizer = _tokenizer(path, hc)
    if model.tokenizer is None and hc.provenance and cfg.vocab_size == 50257:
        del model.tokenizer  # a dsv3 export without tokenizer files: GPT-2's r50k_base, dsv3's default
    return model


# --- tokenizer ---

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class HFTokenizer:
    """A folder's tokenizer.json through the `tokenizers` package, with the calls dsv3.generate makes of tiktoken's
    encoding (`encode_ordinary`, `decode_single_token_bytes`), plus the ids a prompt starts with (`bos`, or None) and
    generation ends at (`eot`)."""

    def __init__(self, file: Path, bos: int | None, eot: int | None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(file))
        self.bos, self.eot = bos, eot
        decoder = json.dumps(json.loads(self.tok.to_str()).get("decoder"))
        self.byte_level = '"ByteLevel"' in decoder
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode_single_token_bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        piece = self.tok.id_to_token(token)
        if piece is None:
            return b""
        if self.byte_level and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # sentencepiece byte fallback
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.decode_single_token_bytes(t) for t in ids).decode("utf-8", errors="replace")


def _first(x):
    return x[0] if isinstance(x, list) else x


def _tokenizer(path: Path, hc: HFConfig) -> HFTokenizer | None:
    if not (path / "tokenizer.json").is_file():
        return None
    gen = path / "generation_config.json"
    g = json.loads(gen.read_text()) if gen.is_file() else {}
    bos = _first(g.get("bos_token_id", hc.hf.get("bos_token_id")))
    eot = _first(g.get("eos_token_id", hc.hf.get("eos_token_id")))
    return HFTokenizer(path / "tokenizer.json", bos, eot)
