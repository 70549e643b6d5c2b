"""Import from Hugging Face (`dsv3.from_hf`): random transformers DeepSeek-V2/V3 checkpoints (YaRN past the original
context, shared experts, group-limited sigmoid routing with a correction bias, q-LoRA, dense first layers, untied
heads) must give transformers' logits and greedy tokens; sharded and FP8 folders load exactly; export_hf -> from_hf
gives back the same state dict bit for bit; every config field or tensor dsv3 cannot honour is refused by name."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.generate import generate_tokens
from dsv3.hf import dequantize_fp8, from_hf, hf_model_config

transformers = pytest.importorskip("transformers")
FIXTURES = Path(__file__).parent / "fixtures"  # real config.json files, without weights
V2_LITE_CONFIG = json.loads((FIXTURES / "deepseek-v2-lite" / "config.json").read_text())

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1}
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    # DeepSeek-V2-Lite's shape in miniature: 2 shared experts, softmax, greedy top-k, no q-LoRA, YaRN
    "v2-lite": ("DeepseekV2Config", dict(TINY, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                                         norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6,
                                         rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    # DeepSeek-V2's (236B) routing: group_limited_greedy ranks a group by its best softmax score; scale 16
    "v2": ("DeepseekV2Config", dict(TINY, q_lora_rank=24, n_shared_experts=2, topk_method="group_limited_greedy",
                                    num_experts_per_tok=3,  # ranking groups by their best matters for k > topk_group
                                    n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=16.0,
                                    rms_norm_eps=1e-6, rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    # DeepSeek-V3's: q-LoRA, sigmoid + correction bias, 4 groups of 2 experts of which 2 groups are kept, scale 2.5;
    # rms_norm_eps 1e-5 so that the latent norms' fixed 1e-6 differs from the others'
    "v3": ("DeepseekV3Config", dict(TINY, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2,
                                    norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
                                    rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
}


def random_hf(kind: str, seed: int = 0):
    """A transformers model whose every weight matters: norms away from 1, weights 5x transformers' init so that
    attention and routing are far from uniform, a nonzero correction bias."""
    name, kw = CONFIGS[kind]
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(5)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (transformers model, folder written by save_pretrained)."""
    out = {}
    for kind in CONFIGS:
        hf = random_hf(kind)
        path = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(path)
        out[kind] = hf, path
    return out


def router_inputs(model, tokens):
    """The input of every MoE layer for `tokens` (forward hooks)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
             for m in model.moe_layers()]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_transformers_past_the_original_context(kind, saved):
    hf, path = saved[kind]
    model = from_hf(path)
    cfg = model.cfg
    assert cfg.yarn_factor == 4 and cfg.yarn_original_max_seq_len == 64 and not cfg.tie_embeddings
    assert cfg.n_dense_layers == 1 and len(model.moe_layers()) == 2
    torch.manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 200))  # 200 positions: past YaRN's original 64
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert theirs.std() > 0.5
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
    plain = dsv3.DeepSeekV3(cfg.replace(yarn_factor=1.0)).eval()  # the same weights without YaRN: far off
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(x).logits - theirs).abs().max().item() > 1e-2 * theirs.abs().max().item()

    # routing decisions actually differ between tokens and experts
    for layer, u in zip(model.moe_layers(), router_inputs(model, x), strict=True):
        _, idx, _, logits = layer.gate(u)
        assert idx.unique().numel() == cfg.n_routed_experts  # every expert is chosen by some token
        if kind != "v2-lite":  # the group limit drops experts that plain top-k of the (biased) scores would pick
            scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
            plain = (scores + layer.gate.bias).topk(cfg.n_activated_experts, dim=-1).indices
            differs = (plain.sort(-1).values != idx.sort(-1).values).any(-1).float().mean().item()
            assert 0.05 < differs < 1
        if kind == "v3":
            assert layer.gate.bias.abs().min() > 0 and layer.gate.bias.dtype == torch.float32


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_tokens_match_transformers_generate(kind, saved):
    hf, path = saved[kind]
    model = from_hf(path)
    torch.manual_seed(2)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 70))  # decoding continues past the original context
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False)[:, 70:]
    for cache in ("absorbed", "naive", "none"):
        ours = torch.stack(list(generate_tokens(model, prompt, 12, temperature=0, cache=cache)), dim=1)
        assert torch.equal(ours, theirs), cache
    trace = []
    ours = torch.stack(list(dsv3.generate_tokens(model, prompt, 12, temperature=0, trace=trace)), dim=1)
    assert torch.equal(ours, theirs)
    ids = torch.cat([t[0] for t in trace], dim=2)  # (moe layers, batch, positions, k)
    assert ids.shape == (2, 1, 70 + 12, model.cfg.n_activated_experts)


def test_sharded_folder_loads_the_same_weights(saved, tmp_path):
    hf, path = saved["v3"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    a, b = from_hf(path).state_dict(), from_hf(tmp_path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def quantize_fp8(w: torch.Tensor, block=(128, 128)):
    """DeepSeek-V3's blockwise FP8: per block, the largest |w| maps to e4m3's max, 448; scale_inv = 1 / scale."""
    rows, cols = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
    padded = torch.zeros(rows * block[0], cols * block[1])
    padded[: w.shape[0], : w.shape[1]] = w
    blocks = padded.view(rows, block[0], cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view_as(padded)[: w.shape[0], : w.shape[1]].contiguous(), scale_inv


def test_fp8_blockwise_weights_are_dequantised_exactly(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved["v3"]
    block = (16, 32)  # several blocks per matrix at this size, and partial blocks at the edges
    sd = load_file(path / "model.safetensors")
    ref = dict(sd)
    n = 0
    for name, w in list(sd.items()):
        if w.dim() == 2 and ".layers." in name and "gate.weight" not in name:  # DeepSeek-V3 quantises these
            q, s = quantize_fp8(w, block)
            sd[name], sd[name + "_scale_inv"] = q, s
            ref[name] = dequantize_fp8(q, s, block)
            n += 1
    assert n > 20
    save_file(sd, tmp_path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(ref, tmp_path / "ref.safetensors")
    fp8 = from_hf(tmp_path).state_dict()
    (tmp_path / "ref.safetensors").replace(tmp_path / "model.safetensors")
    dense = from_hf(tmp_path).state_dict()
    assert all(torch.equal(fp8[k], dense[k]) for k in dense)
    del sd["model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"]  # an FP8 weight without its scale
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="experts.3.up_proj.weight is F8_E4M3: only float8_e4m3fn weights have a"):
        from_hf(tmp_path)
    # the dequantisation itself: each block times its own scale
    w = torch.randn(40, 70)
    q, s = quantize_fp8(w, block)
    d = dequantize_fp8(q, s, block)
    assert torch.equal(d[16:32, 32:64], q[16:32, 32:64].float() * s[1, 1])
    assert (d - w).abs().max() <= w.abs().max() * 2 ** -3  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("preset", ["tiny", "174m", "smollm2-135m"])
def test_export_then_import_is_bitwise(preset, tmp_path):
    torch.manual_seed(0)
    if preset == "tiny":
        model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset(preset))
        with torch.no_grad():  # a nonzero norm weight everywhere, so the latent rescale has something to undo
            for p in model.parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
    else:
        model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset(preset))
    dsv3.export_hf(model, tmp_path)
    back = from_hf(tmp_path)
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad
    assert not hasattr(back, "tokenizer")  # GPT-2 vocabulary, no tokenizer files: tiktoken, as for our own models


def test_info_reads_a_config_alone(capsys):
    """The real config.json files of DeepSeek-V2-Lite and DeepSeek-V3 (no weights): their published sizes."""
    from dsv3.__main__ import main

    cfg = hf_model_config(FIXTURES / "deepseek-v2-lite")
    assert (cfg.dim, cfg.n_layers, cfg.n_routed_experts, cfg.n_shared_experts, cfg.yarn_factor) == (2048, 27, 64, 2, 40)
    assert main(["info", "--hf", str(FIXTURES / "deepseek-v2-lite"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    p = info["params"]
    assert p["total"] == 15_706_484_224  # DeepSeek-V2-Lite's published count (15.7B)
    assert 2.35e9 < p["active"] - p["embedding"] < 2.5e9  # "2.4B activated" in its model card (lookups not counted)
    assert info["weight_bytes_bf16"] == 2 * p["total"]
    assert info["cache_values_per_token_per_layer"] == 512 + 64
    assert main(["info", "--hf", str(FIXTURES / "deepseek-v3"), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["params"]
    assert 671.0e9 < p["total"] < 671.1e9  # "671B total parameters" (without the 14B MTP module)
    assert 36.5e9 < p["active"] - p["embedding"] < 37.7e9  # "37B activated for each token"
    cfg = hf_model_config(FIXTURES / "deepseek-v3")
    assert (cfg.q_lora_rank, cfg.n_expert_groups, cfg.n_limited_groups, cfg.score_func) == (1536, 8, 4, "sigmoid")


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(topk_method="noaux_tc"), "topk_method='noaux_tc' is not supported"),
    (dict(norm_topk_prob=True), "norm_topk_prob=True is not supported"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2 is not supported"),
    (dict(num_key_value_heads=8), "num_key_value_heads=8 is not supported"),
    (dict(sliding_window=128), "unknown config field(s) sliding_window"),
    (dict(model_type="mixtral"), "model_type='mixtral' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear' is not supported"),
    (dict(rope_scaling=dict(V2_LITE_CONFIG["rope_scaling"], mscale_all_dim=0)), "scale attention differently"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])
def test_refuses_config_fields_it_cannot_compute(change, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**V2_LITE_CONFIG, **change}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf_model_config(tmp_path)


def test_unknown_missing_and_misshapen_tensors_are_errors(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved["v2-lite"]
    sd = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())

    def check(tensors, message):
        save_file(tensors, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            from_hf(tmp_path)

    check({**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, "unknown 1 tensor.*rotary_emb")
    check({k: v for k, v in sd.items() if k != "model.layers.2.mlp.experts.7.up_proj.weight"},
          "missing 1 tensor.*experts.7.up_proj")
    check({**sd, "model.layers.1.mlp.gate.weight": torch.zeros(8, 63)}, r"gate.weight has shape \[8, 63\]")
    check({**sd, "model.layers.3.mlp.gate.weight": torch.zeros(8, 64)}, "unknown 1 tensor.*layers.3")


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_mtp_layers_load_into_the_mtp_modules(score_func, tmp_path):
    """An export with MTP modules comes back bit for bit (MTP included); DeepSeek's own files also store each MTP
    layer's embedding and head again: equal copies load silently, a differing one is reported; an incomplete MTP
    layer is an error."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset("tiny", n_layers=2, score_func=score_func, n_mtp_layers=1, vocab_size=512)
    model = dsv3.DeepSeekV3(cfg)
    dsv3.export_hf(model, tmp_path)
    back = from_hf(tmp_path)
    assert back.cfg == model.cfg and back.mtp is not None
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd = load_file(tmp_path / "model.safetensors")
    extra = {"model.layers.2.embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
             "model.layers.2.shared_head.head.weight": sd["model.embed_tokens.weight"].clone()}
    save_file({**sd, **extra}, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal copies: nothing to say
        assert torch.equal(from_hf(tmp_path).mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
    extra["model.layers.2.shared_head.head.weight"] = extra["model.layers.2.shared_head.head.weight"] + 1
    save_file({**sd, **extra}, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="shared_head.head.weight differs from the main model's"):
        from_hf(tmp_path)
    save_file({k: v for k, v in sd.items() if k != "model.layers.2.eh_proj.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 tensor.*layers.2.eh_proj"):
        from_hf(tmp_path)


def test_mtp_layers_of_a_config_without_mtp_modules_are_reported_and_skipped(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved["v3"]
    sd = load_file(path / "model.safetensors")
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64)}
    save_file({**sd, **mtp}, tmp_path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    config["num_nextn_predict_layers"] = 0  # not declared: unknown tensors
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="unknown 2 tensor"):
        from_hf(tmp_path)
    assert from_hf(path).mtp is None  # declared, but the files hold no MTP layer (transformers saves none)


def byte_level_tokenizer(path):
    """A byte-level BPE tokenizer.json (DeepSeek's kind) trained offline on a few sentences: ids 0 and 1 are
    <bos> and <eos>, then the 256 bytes, then merges up to the test models' 320 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune, déjà vu"] * 20
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == 320 and tok.token_to_id("<bos>") == 0 and tok.token_to_id("<eos>") == 1
    tok.save(str(path / "tokenizer.json"))
    return tok


def test_text_generation_uses_the_folders_tokenizer(saved, tmp_path, capsys):
    from dsv3.__main__ import main

    hf, path = saved["v3"]
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tok = byte_level_tokenizer(tmp_path)
    model = from_hf(tmp_path)
    assert model.tokenizer is not None and (model.tokenizer.bos, model.tokenizer.eot) == (0, 1)
    prompt = "To be, or not to be, déjà"
    ids = [0] + tok.encode(prompt, add_special_tokens=False).ids  # <bos> first, as transformers' tokenizer does
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=1)[0, len(ids):]
    theirs = theirs.tolist()
    if 1 in theirs:
        theirs = theirs[: theirs.index(1)]
    out = dsv3.generate(model, prompt, max_new_tokens=12, temperature=0, return_trace=True)
    assert out.tokens == ids + theirs
    assert out.text == tok.decode(theirs, skip_special_tokens=True)  # our byte-level decoding = tokenizers'
    assert "".join(out.token_texts[len(ids):]) == out.text
    assert out.expert_ids.shape == (2, len(out.tokens), 2)

    assert main(["generate", "--hf", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + out.text + "\n"
    assert main(["generate", "--hf", str(tmp_path), "--prompt-ids", ",".join(map(str, ids)),
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    plain = torch.stack(list(generate_tokens(model, torch.tensor([ids]), 5, temperature=0)), 1)[0].tolist()
    assert capsys.readouterr().out.split() == [str(t) for t in plain]


def test_without_tokenizer_json_text_is_refused_and_ids_work(saved, capsys):
    from dsv3.__main__ import main

    _, path = saved["v2-lite"]
    model = from_hf(path)
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer .*generate_tokens"):
        dsv3.generate(model, "hello", max_new_tokens=3)
    assert main(["generate", "--hf", str(path), "--prompt", "hello", "--max-new-tokens", "3"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["generate", "--hf", str(path), "--prompt-ids", "5 6 7", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.split()) == 4
    assert main(["generate", "--hf", str(path / "nowhere"), "--prompt-ids", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: --hf: ")


@pytest.mark.slow
def test_compiled_decoding_of_an_imported_model(saved):
    hf, path = saved["v3"]
    model = from_hf(path)
    torch.manual_seed(3)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 66))
    eager = torch.stack(list(generate_tokens(model, prompt, 8, temperature=0)), dim=1)
    compiled = torch.stack(list(generate_tokens(model, prompt, 8, temperature=0, compile=True)), dim=1)
    assert torch.equal(eager, compiled)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)[:, 66:]
    assert torch.equal(compiled, theirs)


def test_bf16_import_keeps_the_router_bias_in_fp32(saved):
    _, path = saved["v3"]
    model = from_hf(path, dtype="bfloat16")
    ref = from_hf(path)
    assert model.embed.weight.dtype == torch.bfloat16
    for m, r in zip(model.moe_layers(), ref.moe_layers(), strict=True):
        assert m.gate.bias.dtype == torch.float32 and torch.equal(m.gate.bias, r.gate.bias)
    assert torch.equal(model.layers[2].ffn.experts.w1, ref.layers[2].ffn.experts.w1.bfloat16())
    assert model.rope_cos.dtype == torch.bfloat16  # as model.to(torch.bfloat16) leaves it
    with pytest.raises(ValueError, match="dtype must be one of"):
        from_hf(path, dtype="int8")


def test_llama_folder_matches_transformers(tmp_path):
    """The dense GQA baseline's format (SmolLM2's kind): LlamaForCausalLM, tied head, no permutation."""
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=1e5)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(5)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert (model.cfg.attn, model.cfg.n_kv_heads, model.cfg.head_dim, model.cfg.tie_embeddings) == ("gqa", 2, 16, True)
    assert model.head.weight is model.embed.weight
    x = torch.randint(0, 320, (2, 50))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()


def test_dsv3_config_in_an_export_is_checked_and_optional(tmp_path):
    torch.manual_seed(5)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny", n_layers=2, score_func="sigmoid")).eval()
    dsv3.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edited = dict(config, rope_parameters=dict(config["rope_parameters"], rope_theta=5e5))
    (tmp_path / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="dsv3_config disagrees with the transformers fields on rope_theta"):
        from_hf(tmp_path)
    # without it the folder reads like any transformers checkpoint: latent norms with eps 1e-6 on the rescaled rows,
    # the same function (not the same bits), and the training-only fields at their defaults
    del config["dsv3_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    plain = from_hf(tmp_path)
    assert plain.cfg.latent_norm_eps == 1e-6 and plain.cfg.aux_loss_coef == 1e-3 != model.cfg.aux_loss_coef
    assert not torch.equal(plain.layers[0].attn.wkv_a.weight, model.layers[0].attn.wkv_a.weight)
    x = torch.randint(0, model.cfg.vocab_size, (1, 32))
    with torch.no_grad():
        ours, theirs = plain(x).logits, model(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
