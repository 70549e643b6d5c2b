"""Export to Hugging Face: transformers' own DeepseekV2/V3/Llama classes, loaded from our export, must compute
our logits (max abs diff <= 1e-4 in fp32) and our greedy continuations; inexpressible settings are refused."""

import json
import sys

import pytest
import torch

import dsv3
from dsv3.export_hf import export_hf, hf_state_dict
from dsv3.generate import generate_tokens

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=512, dim=64, n_layers=2, n_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, dense_inter_dim=96, max_seq_len=128)

KINDS = {
    # softmax routing -> DeepseekV2; 8 groups of one expert is plain top-k, so it is allowed
    "softmax-moe": (dict(SMALL, n_expert_groups=8, n_limited_groups=2), "DeepseekV2ForCausalLM"),
    # sigmoid routing with a random aux-free bias, query compression, group-limited routing, a dense first
    # layer, untied head, route scale, and a large norm_eps so the latent-norm eps rewrite is visible
    "sigmoid-moe": (dict(SMALL, score_func="sigmoid", q_lora_rank=24, n_expert_groups=4, n_limited_groups=2,
                         n_dense_layers=1, n_layers=3, route_scale=2.5, tie_embeddings=False, norm_eps=1e-2),
                    "DeepseekV3ForCausalLM"),
    "softmax-moe-qlora-no-shared": (dict(SMALL, q_lora_rank=24, n_shared_experts=0), "DeepseekV2ForCausalLM"),
    "dense-mla": (dict(SMALL, ffn="dense"), "DeepseekV3ForCausalLM"),
    # multi-token prediction modules: written as DeepSeek-V3's model.layers.{n_layers}; the main model is unchanged
    "sigmoid-moe-mtp": (dict(SMALL, score_func="sigmoid", q_lora_rank=24, n_dense_layers=1, n_layers=3,
                             tie_embeddings=False, norm_eps=1e-2, n_mtp_layers=1), "DeepseekV3ForCausalLM"),
    "softmax-moe-mtp": (dict(SMALL, n_mtp_layers=2), "DeepseekV2ForCausalLM"),
    "dense-gqa": (dict(SMALL, attn="gqa", ffn="dense", n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=1e5),
                  "LlamaForCausalLM"),
}


def random_model(seed=0, **overrides) -> dsv3.DeepSeekV3:
    """A model whose every weight matters: norms away from 1, weights large enough that attention and
    routing are far from uniform, and (sigmoid) a router bias that changes which experts are picked."""
    torch.manual_seed(seed)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(5)
        if model.cfg.score_func == "sigmoid":
            for m in model.moe_layers():
                m.gate.bias.copy_(0.1 * torch.randn_like(m.gate.bias))
    return model


def greedy(model, prompt, n):
    """Our greedy decoding: dsv3's generator (prefill, then one position at a time against the latent cache)."""
    return torch.stack(list(generate_tokens(model, prompt, n, temperature=0)), dim=1)


def exported(kind, tmp_path):
    overrides, arch = KINDS[kind]
    model = random_model(**overrides)
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == arch
    return model, hf


@pytest.mark.parametrize("kind", list(KINDS))
def test_transformers_computes_our_logits(kind, tmp_path):
    model, hf = exported(kind, tmp_path)
    torch.manual_seed(1)
    for batch, T in ((3, 40), (1, 7)):
        x = torch.randint(0, model.cfg.vocab_size, (batch, T))
        with torch.no_grad():
            ours, theirs = model(x).logits, hf(x).logits
        assert ours.std() > 0.5  # logits are not near-constant, so agreement means something
        assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["softmax-moe", "sigmoid-moe", "dense-gqa"])
def test_transformers_greedy_generate_equals_ours(kind, tmp_path):
    model, hf = exported(kind, tmp_path)
    torch.manual_seed(2)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False)
    assert torch.equal(theirs[:, 5:], greedy(model, prompt, 32))


def test_written_files_and_generation_config(tmp_path):
    model = random_model(vocab_size=50257, dim=32, n_layers=1, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, score_func="sigmoid")
    export_hf(model, tmp_path / "new" / "dir")
    out = tmp_path / "new" / "dir"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["tie_word_embeddings"] is True
    assert config["rope_interleave"] is True and config["q_lora_rank"] is None
    assert (config["bos_token_id"], config["eos_token_id"], gen["bos_token_id"], gen["eos_token_id"]) == (50256,) * 4
    # tied: one matrix is written and transformers ties the head to it
    assert "lm_head.weight" not in hf_state_dict(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.model.layers[0].mlp.gate.e_score_correction_bias, model.layers[0].ffn.gate.bias)


@pytest.mark.parametrize("overrides, setting", [
    (dict(norm_topk_prob=True), "norm_topk_prob=True with score_func='softmax'"),
    (dict(n_expert_groups=4, n_limited_groups=2), "n_expert_groups=4, n_limited_groups=2"),
    (dict(attn="gqa", n_heads=4, n_kv_heads=2, head_dim=16), "attn='gqa' with ffn='moe'"),
    (dict(ffn="dense", n_mtp_layers=1), "n_mtp_layers=1 with attn='mla', ffn='dense'"),
])
def test_refuses_settings_transformers_cannot_express(overrides, setting, tmp_path):
    model = random_model(**dict(SMALL, **overrides))
    with pytest.raises(ValueError, match="cannot export to Hugging Face exactly") as e:
        export_hf(model, tmp_path / "out")
    assert setting in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_refuses_softmax_with_a_router_bias_but_not_a_constant_one(tmp_path):
    model = random_model(**SMALL)
    with torch.no_grad():
        model.layers[1].ffn.gate.bias.fill_(0.3)  # the same shift for every expert: selection unchanged
    export_hf(model, tmp_path / "ok")
    with torch.no_grad():
        model.layers[1].ffn.gate.bias[3] += 0.1
    with pytest.raises(ValueError, match="router bias of MoE layer 1 is nonzero.*no e_score_correction_bias"):
        export_hf(model, tmp_path / "refused")


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install dsv3\[hf\]"):
        export_hf(random_model(**SMALL), tmp_path)


def test_cli_exports_a_checkpoint_and_refuses_with_a_one_line_error(tmp_path, capsys):
    from dsv3.__main__ import main

    model = random_model(**dict(SMALL, score_func="sigmoid"))
    dsv3.save_checkpoint(tmp_path / "run", model, step=7)
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "DeepseekV3ForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= 1e-4

    capsys.readouterr()  # drop transformers' loading progress bar
    refused = random_model(**dict(SMALL, norm_topk_prob=True))
    dsv3.save_checkpoint(tmp_path / "run2", refused, step=1)
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run2"), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export") and "norm_topk_prob" in err and err.count("\n") == 1
    assert main(["export-hf", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "hf3")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- multi-token prediction: transformers' own MTP layer (generate(use_mtp=True)) as the oracle ---

def exported_mtp(tmp_path):
    """The sigmoid-moe-mtp export, its transformers model, and transformers' MtpModel read from the same folder."""
    from transformers.modeling_layers import MtpModel

    model, hf = exported("sigmoid-moe-mtp", tmp_path)
    # transformers finds the MTP layer by DeepseekV3's ignore pattern, written for DeepSeek-V3's 61 layers
    # (model.layers.61); point it at this model's model.layers.{n_layers}
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{model.cfg.n_layers}\..*"]
    return model, hf, MtpModel


def test_export_writes_deepseeks_mtp_names(tmp_path):
    model, hf, _ = exported_mtp(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    names = set(hf_state_dict(model))
    n = model.cfg.n_layers
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "input_layernorm", "self_attn.q_a_proj",
                 "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj", "mlp.gate", "mlp.experts.0.down_proj"):
        assert f"model.layers.{n}.{name}.weight" in names, name
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in names)


def test_our_draft_logits_are_transformers_mtp_draft_logits(tmp_path):
    model, hf, MtpModel = exported_mtp(tmp_path)
    mtp = MtpModel.from_pretrained(hf, device_map={"": "cpu"}).eval()
    torch.manual_seed(3)
    x = torch.randint(0, model.cfg.vocab_size, (2, 17))
    T = x.shape[1]
    with torch.no_grad():
        h = hf(x, output_hidden_states=True).hidden_states[-1]  # after the final norm, as generate(use_mtp) takes it
        # theirs: depth 1 at position i reads h_i and the token t_{i+1} (at position i + 1: RoPE is relative)
        theirs = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], torch.arange(1, T)[None], None,
                                                          input_ids=x[:, 1:]))
        out = model(x)
        hk, _, _ = model.mtp[0](out.hidden[:, :-1], model.embed(x[:, 1:]), model.rope_cos[:T - 1],
                                model.rope_sin[:T - 1])
        ours = model.head(hk)
    assert ours.std() > 0.5
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (out.hidden - h).abs().max().item() <= 1e-4


def test_transformers_use_mtp_generate_gives_our_greedy_tokens_and_drafts(tmp_path, monkeypatch):
    model, hf, MtpModel = exported_mtp(tmp_path)
    their_drafts = []
    forward = MtpModel.forward

    def record(self, *a, **k):
        ids, logits, loss = forward(self, *a, **k)
        their_drafts.extend(ids[0].tolist())
        return ids, logits, loss

    monkeypatch.setattr(MtpModel, "forward", record)
    torch.manual_seed(2)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 5))
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, use_mtp=True)
    drafts = []
    ours = torch.stack(list(generate_tokens(model, prompt, 32, temperature=0, speculative=True, drafts=drafts)), 1)
    assert torch.equal(theirs[:, 5:], ours) and torch.equal(ours, greedy(model, prompt, 32))
    ours_drafted = [d for d in torch.cat(drafts).tolist() if d >= 0]
    # both propose one draft per round and keep the same tokens, so the rounds line up (transformers also drafts
    # past the last token it keeps)
    assert len(ours_drafted) >= 10 and their_drafts[:len(ours_drafted)] == ours_drafted
