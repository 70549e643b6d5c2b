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

Weight rewrites (all exact):
  RoPE layout  -- we rotate the first half of the rope dims against the second half; DeepSeek's
                  checkpoints (and both transformers classes, V2 always, V3 with rope_interleave=True) pair
                  adjacent dims. Permuting the rope rows of q and k_pe to [0, d/2, 1, d/2+1, ...] makes the
                  pairs line up; the attention score is a dot product, so the order it sees does not matter.
  latent norms -- transformers builds kv_a_layernorm / q_a_layernorm with a fixed eps of 1e-6, we use
                  norm_eps (or latent_norm_eps). RMSNorm(s x; eps') = RMSNorm(x; eps'/s^2), so scaling the rows
                  that produce c_kv (and c_q) by s = sqrt(1e-6 / norm_eps) gives our eps. fl(x s) loses bits, so
                  those tensors are written one precision wider (fp32 -> fp64), and config.json carries our own
                  config (`dsv3_config`, also the training-only fields): `dsv3.from_hf` undoes the rescale exactly.
  experts      -- our stacked w1/w3 (N, dim, inter), w2 (N, inter, dim) become the per-expert
                  gate_proj/up_proj/down_proj matrices of DeepSeek's own checkpoints (transformers fuses them
                  on load; other serving stacks read the same names).
  MTP layers   -- depth k is written as DeepSeek-V3 writes its MTP layer, model.layers.{n_layers + k - 1}: enorm,
                  hnorm, eh_proj, shared_head.norm and the block's usual names (the embedding and head are the
                  main model's, not repeated), with num_nextn_predict_layers in config.json. transformers'
                  DeepseekV3 drafts with it in generate(..., use_mtp=True); DeepseekV2 (softmax routing) loads the
                  main model and leaves the MTP layer unread.
Deliberately not here: tokenizer files (we use tiktoken's r50k_base; point users at the GPT-2 tokenizer),
dtype conversion (tensors keep the model's dtype, but for the
rescaled latent rows). Importing is `dsv3/hf.py`. `transformers` is optional: imported only inside functions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from .checkpoint import umask_mode
from .config import ModelConfig
from .model import DeepSeekV3
from .moe import MoE

EOT = 50256  # <|endoftext|> of r50k_base: bos and eos of the exported model
HF_LATENT_NORM_EPS = 1e-6  # eps transformers gives DeepseekV2/V3's kv_a_layernorm and q_a_layernorm
WIDER = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}


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


def _rope_perm(d: int) -> torch.Tensor:
    """Row order that turns our half-split rope dims into adjacent pairs: [0, d/2, 1, d/2 + 1, ...]."""
    return torch.arange(d).view(2, d // 2).t().reshape(-1)


def hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, with the exact rewrites listed in the module docstring."""
    cfg = model.cfg
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = model.head.weight
    if cfg.attn == "mla":
        perm = _rope_perm(cfg.qk_rope_head_dim)
        s = math.sqrt(HF_LATENT_NORM_EPS / (cfg.latent_norm_eps or cfg.norm_eps))

        def wide(w):  # rescaled rows are written one precision wider, so that from_hf undoes the rescale exactly
            return w if s == 1 else w.to(WIDER.get(w.dtype, w.dtype))

        def q_rows(w):  # (H * (nope + rope), in): permute each head's rope rows
            w = w.view(cfg.n_heads, cfg.qk_head_dim, -1)
            return torch.cat([w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:][:, perm]], 1).flatten(0, 1)

    blocks = [(f"model.layers.{i}.", block) for i, block in enumerate(model.layers)]
    for k, layer in enumerate(model.mtp or []):  # DeepSeek-V3's MTP layer: model.layers.{n_layers + k}
        p = f"model.layers.{cfg.n_layers + k}."
        sd[p + "enorm.weight"], sd[p + "hnorm.weight"] = layer.enorm.weight, layer.hnorm.weight
        sd[p + "eh_proj.weight"], sd[p + "shared_head.norm.weight"] = layer.eh_proj.weight, layer.norm.weight
        blocks.append((p, layer.block))
    for p, block in blocks:
        a, f = block.attn, block.ffn
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        if cfg.attn == "gqa":
            for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
                sd[p + f"self_attn.{theirs}.weight"] = getattr(a, ours).weight
        else:
            if cfg.q_lora_rank == 0:
                sd[p + "self_attn.q_proj.weight"] = q_rows(a.wq.weight)
            else:
                sd[p + "self_attn.q_a_proj.weight"] = wide(a.wq_a.weight) * s
                sd[p + "self_attn.q_a_layernorm.weight"] = a.q_norm.weight
                sd[p + "self_attn.q_b_proj.weight"] = q_rows(a.wq_b.weight)
            c_kv, k_pe = a.wkv_a.weight.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim])
            sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = torch.cat([wide(c_kv) * s, wide(k_pe[perm])])
            sd[p + "self_attn.kv_a_layernorm.weight"] = a.kv_norm.weight
            sd[p + "self_attn.kv_b_proj.weight"] = a.wkv_b.weight
            sd[p + "self_attn.o_proj.weight"] = a.wo.weight
        mlp = p + "mlp."
        if not isinstance(f, MoE):
            sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"] = f.w1.weight, f.w3.weight
            sd[mlp + "down_proj.weight"] = f.w2.weight
            continue
        sd[mlp + "gate.weight"] = f.gate.weight
        if hf_architecture(cfg) == "DeepseekV3ForCausalLM":
            sd[mlp + "gate.e_score_correction_bias"] = f.gate.bias.float()
        e = f.experts
        for j in range(cfg.n_routed_experts):  # nn.Linear stores (out, in): transpose our (in, out) stacks
            sd[mlp + f"experts.{j}.gate_proj.weight"] = e.w1[j].t()
            sd[mlp + f"experts.{j}.up_proj.weight"] = e.w3[j].t()
            sd[mlp + f"experts.{j}.down_proj.weight"] = e.w2[j].t()
        sh = f.shared_experts
        if sh is None:  # transformers always builds the shared MLP; width 0 makes it output zeros
            sd[mlp + "shared_experts.gate_proj.weight"] = e.w1.new_zeros(0, cfg.dim)
            sd[mlp + "shared_experts.up_proj.weight"] = e.w1.new_zeros(0, cfg.dim)
            sd[mlp + "shared_experts.down_proj.weight"] = e.w1.new_zeros(cfg.dim, 0)
        else:
            sd[mlp + "shared_experts.gate_proj.weight"] = sh.w1.weight
            sd[mlp + "shared_experts.up_proj.weight"] = sh.w3.weight
            sd[mlp + "shared_experts.down_proj.weight"] = sh.w2.weight
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


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
        raise ValueError(f"out_dir must be a directory, got an existing file: {out}")
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
    print(f"wrote {hf_architecture(model.cfg)} ({sum(p.numel() for p in model.parameters()):,} parameters) to {out}")
    return 0
