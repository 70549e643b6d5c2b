"""Export to Hugging Face transformers: `export_hf(model, out_dir)` writes config.json, model.safetensors
and generation_config.json that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads with
no custom code; `cmd_export_hf` is `python -m dsv3 export-hf --checkpoint PATH --out DIR`.

Which class (`hf_architecture`):
  MLA + sigmoid-scored MoE  -> DeepseekV3ForCausalLM (our gate bias = e_score_correction_bias, selection only)
  MLA + softmax-scored MoE  -> DeepseekV2ForCausalLM (topk_method="greedy": softmax, top-k, no renormalisation;
                               "group_limited_greedy" with group_score="max")
  MLA + dense SwiGLU only   -> DeepseekV3ForCausalLM with every layer dense (first_k_dense_replace = n_layers)
  GQA + dense SwiGLU        -> LlamaForCausalLM
Anything one of these classes cannot compute exactly is refused with a ValueError naming the setting
(`unsupported_settings`); the export never writes a model that computes something else. Refused today:
GQA + MoE; YaRN with GQA; and with softmax scoring: norm_topk_prob=True, group-limited routing that drops groups
ranked by their top two (group_score="top2"; sigmoid scoring: "max"), a router bias that differs between
experts. Training-only settings (aux/z-loss coefficients, bias_update_speed) do not matter.

Weight names and their exact rewrites (RoPE layout, latent-norm rescale written one precision wider, per-expert
matrices, MTP layers as model.layers.{n_layers + k - 1}) are `dsv3/names.py`, the one map import and export share;
config.json carries our own config (`dsv3_config`, also the training-only fields), so that `dsv3.from_hf` undoes
the latent rescale exactly. transformers' DeepseekV3 drafts with the MTP layers in generate(..., use_mtp=True);
DeepseekV2 (softmax routing) loads the main model and leaves them unread.
Deliberately not here: tokenizer files (we use tiktoken's r50k_base; point users at the GPT-2 tokenizer),
dtype conversion (tensors keep the model's dtype, but for the rescaled latent rows). Importing is `dsv3/hf.py`.
`transformers` is optional: imported only inside functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import umask_mode
from .config import ModelConfig, SettingError
from .model import DeepSeekV3
from .names import hf_weights, latent_scale

EOT = 50256  # <|endoftext|> of r50k_base: bos and eos of the exported model


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("export to Hugging Face needs transformers: pip install dsv3[hf]") from e
    return transformers


def _groups_noop(cfg: ModelConfig) -> bool:
    """Group-limited routing changes nothing when every group is kept or groups hold one expert each
    (then keeping the best n_limited_groups experts and taking the top-k of them is plain top-k)."""
    return cfg.n_limited_groups == cfg.n_expert_groups or cfg.n_routed_experts == cfg.n_expert_groups


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class a config exports to (settings are checked by `unsupported_settings`)."""
    if cfg.attn == "gqa":
        return "LlamaForCausalLM"
    if cfg.has_moe and cfg.score_func == "softmax":
        return "DeepseekV2ForCausalLM"
    return "DeepseekV3ForCausalLM"


def unsupported_settings(model: DeepSeekV3) -> list[str]:
    """Settings of this model that the target transformers class cannot compute exactly (empty = exportable)."""
    cfg, bad = model.cfg, []
    if cfg.yarn_factor > 1 and cfg.attn == "gqa":
        bad.append("yarn_factor > 1 with attn='gqa': YaRN is exported for MLA (DeepSeek) models only")
    if cfg.has_moe and cfg.score_func == "sigmoid" and cfg.group_score == "max" and not _groups_noop(cfg):
        bad.append("group_score='max' with score_func='sigmoid': DeepseekV3 ranks a group by the sum of its top two")
    if model.mtp is not None and (cfg.attn == "gqa" or not cfg.has_moe):
        bad.append(f"n_mtp_layers={cfg.n_mtp_layers} with attn={cfg.attn!r}, ffn={cfg.ffn!r}: DeepSeek's MTP layer "
                   "is an MLA + MoE block (transformers builds it so), and Llama has none (use attn='mla', "
                   "ffn='moe')")
    if cfg.attn == "gqa":
        if cfg.has_moe:
            bad.append("attn='gqa' with ffn='moe': no transformers class combines LLaMA attention with "
                       "DeepSeekMoE (use ffn='dense', or attn='mla')")
        return bad
    if not cfg.has_moe or cfg.score_func == "sigmoid":
        return bad
    # softmax scoring -> DeepseekV2: greedy top-k of the softmax, no bias, no renormalisation
    if cfg.topk_norm:
        bad.append("norm_topk_prob=True with score_func='softmax': DeepseekV2 never renormalises the top-k "
                   "gates (use score_func='sigmoid' for DeepseekV3, or norm_topk_prob=False)")
    if not _groups_noop(cfg) and cfg.group_score != "max":
        bad.append(f"n_expert_groups={cfg.n_expert_groups}, n_limited_groups={cfg.n_limited_groups} with "
                   "score_func='softmax': DeepseekV2's group_limited_greedy ranks a group by its best expert, "
                   "ours by the sum of its top two (use group_score='max', or score_func='sigmoid' for DeepseekV3)")
    for i, m in enumerate(model.moe_layers(mtp=True)):
        b = m.gate.bias
        if not torch.all(b == b[0]):  # a constant shift of every score does not change the selection
            bad.append(f"the router bias of MoE layer {i} is nonzero (aux-loss-free balancing, bias_update_speed="
                       f"{cfg.bias_update_speed}) with score_func='softmax': DeepseekV2 has no "
                       "e_score_correction_bias (train with score_func='sigmoid' to keep the bias)")
            break
    return bad


def hf_config(model: DeepSeekV3):
    """The transformers config object for this model (raises ValueError if it cannot be exported)."""
    transformers = _require_transformers()
    cfg = model.cfg
    bad = unsupported_settings(model)
    if bad:
        raise ValueError("cannot export to Hugging Face exactly: " + "; ".join(bad))
    arch = hf_architecture(cfg)
    eot = EOT if cfg.vocab_size > EOT else None  # only the GPT-2 vocabulary has <|endoftext|>
    common = dict(
        architectures=[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg), hidden_act="silu", dsv3_config=cfg.to_dict(),
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, bos_token_id=eot, eos_token_id=eot,
        initializer_range=cfg.init_std, dtype=str(model.embed.weight.dtype).removeprefix("torch."),
    )
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(**common, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                        intermediate_size=cfg.dense_inter_dim, mlp_bias=False)
    n_group, topk_group = (1, 1) if _groups_noop(cfg) else (cfg.n_expert_groups, cfg.n_limited_groups)
    mla = dict(
        num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        intermediate_size=cfg.dense_inter_dim, moe_intermediate_size=cfg.moe_inter_dim,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.n_activated_experts, routed_scaling_factor=cfg.route_scale,
        norm_topk_prob=cfg.topk_norm, n_group=n_group, topk_group=topk_group,
        first_k_dense_replace=cfg.n_dense_layers if cfg.has_moe else cfg.n_layers,
        moe_layer_freq=1,  # read by other serving stacks (DeepSeek's own config field)
    )
    if arch == "DeepseekV2ForCausalLM":  # (DeepseekV2 reads no MTP layer: num_nextn_predict_layers is for others)
        topk_method = "greedy" if _groups_noop(cfg) else "group_limited_greedy"
        return transformers.DeepseekV2Config(**common, **mla, topk_method=topk_method, scoring_func="softmax",
                                             **({"num_nextn_predict_layers": cfg.n_mtp_layers} if model.mtp else {}))
    return transformers.DeepseekV3Config(**common, **mla, rope_interleave=True, num_mtp_layers=cfg.n_mtp_layers,
                                         topk_method="noaux_tc", scoring_func="sigmoid")


def _rope_parameters(cfg: ModelConfig) -> dict:
    if cfg.yarn_factor == 1:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.yarn_factor,
            "original_max_position_embeddings": cfg.yarn_original_max_seq_len, "beta_fast": cfg.yarn_beta_fast,
            "beta_slow": cfg.yarn_beta_slow, "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim}


def hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, rewritten as `dsv3.names` says for the class we export to."""
    cfg = model.cfg
    weights = hf_weights(model, rope_pairs=True, latent_scale=latent_scale(cfg) if cfg.attn == "mla" else 1.0,
                         router_bias=hf_architecture(cfg) == "DeepseekV3ForCausalLM")
    return {k: (w.to_hf(w.ours) if w.to_hf else w.ours).detach().cpu().contiguous().clone()
            for k, w in weights.items()}


def export_hf(model: DeepSeekV3, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and generation_config.json to out_dir; return out_dir.

    Raises ValueError naming every setting the target class cannot compute exactly (nothing is written then),
    ImportError (with the pip command) when transformers is not installed.
    """
    if not isinstance(model, DeepSeekV3):
        raise ValueError(f"model must be a dsv3.DeepSeekV3, got {type(model).__name__}")
    transformers = _require_transformers()
    from safetensors.torch import save_file

    config = hf_config(model)  # refuses before anything is written
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SettingError(f"out_dir must be a directory, got an existing file: {out}")
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = hf_state_dict(model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    umask_mode(out / "model.safetensors")  # safetensors writes 0600
    config.save_pretrained(out)
    eot = config.eos_token_id
    transformers.GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot).save_pretrained(out)
    return out


def cmd_export_hf(args) -> int:
    """`python -m dsv3 export-hf --checkpoint PATH --out DIR`."""
    from . import load_checkpoint

    model = load_checkpoint(args.checkpoint, map_location="cpu", best=getattr(args, "best", False))
    try:
        out = export_hf(model, args.out)
    except ImportError as e:  # transformers is an optional extra: a one-line error, like bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SettingError as e:  # "--out must be a directory, ..."
        raise ValueError(e.named({"out_dir": "--out"}.get)) from None
    except OSError as e:  # a folder that cannot be made or written (a file on the path, no permission, a full disk)
        raise OSError(f"--out {args.out}: cannot write the export there ({e.strerror or e})") from None
    print(f"wrote {hf_architecture(model.cfg)} ({sum(p.numel() for p in model.parameters()):,} parameters) to {out}")
    return 0
