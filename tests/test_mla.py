"""MLA: the module against a per-head reference, decoupled RoPE, and the latent KV cache paths."""

import math

import pytest
import torch
from conftest import small_cfg

import dsv3
from dsv3.layers import apply_rope, rope_cache
from dsv3.mla import MLA


def reference_mla(attn: MLA, x: torch.Tensor, cfg) -> torch.Tensor:
    """Per-head MLA written out from the paper's equations, one head at a time."""
    B, T, _ = x.shape
    H, dn, dr, dv, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    cos, sin = rope_cache(dr, T, cfg.rope_theta)
    if cfg.q_lora_rank:  # eq. 12-13: the query's own latent c_q, normalised, then up-projected
        c_q = x @ attn.wq_a.weight.T
        c_q = c_q / torch.sqrt(c_q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.q_norm.weight
        q = (c_q @ attn.wq_b.weight.T).view(B, T, H, dn + dr)
    else:
        q = (x @ attn.wq.weight.T).view(B, T, H, dn + dr)
    latent = x @ attn.wkv_a.weight.T
    c_kv = attn.kv_norm(latent[..., :R])  # eq. 9: the compressed latent
    k_pe = apply_rope(latent[..., R:], cos, sin)  # eq. 15: ONE rope key per token, from the hidden state
    w = attn.wkv_b.weight.view(H, dn + dv, R)
    heads = []
    for h in range(H):
        q_nope, q_pe = q[:, :, h, :dn], apply_rope(q[:, :, h, dn:], cos, sin)
        k_nope = c_kv @ w[h, :dn].T  # eq. 10
        v = c_kv @ w[h, dn:].T  # eq. 11
        scores = (q_nope @ k_nope.transpose(1, 2) + q_pe @ k_pe.transpose(1, 2)) / math.sqrt(dn + dr)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_matches_per_head_reference(q_lora_rank):
    cfg = small_cfg(q_lora_rank=q_lora_rank)
    torch.manual_seed(123)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 12, cfg.dim)
    cos, sin = rope_cache(cfg.qk_rope_head_dim, 12, cfg.rope_theta)
    want = reference_mla(attn, x, cfg)
    assert torch.allclose(attn(x, cos, sin), want, atol=1e-5)
    with dsv3.kernels.disabled():
        assert torch.allclose(attn(x, cos, sin), want, atol=1e-5)


def test_rope_only_touches_rope_dims_and_is_relative():
    cfg = small_cfg()
    cos, sin = rope_cache(8, 64, cfg.rope_theta)
    q, k = torch.randn(8), torch.randn(8)
    # scores depend on the position difference only
    s1 = apply_rope(q, cos[3], sin[3]) @ apply_rope(k, cos[1], sin[1])
    s2 = apply_rope(q, cos[40], sin[40]) @ apply_rope(k, cos[38], sin[38])
    assert torch.allclose(s1, s2, atol=1e-5)
    assert torch.equal(apply_rope(q, cos[0], sin[0]), q)  # position 0 is the identity
    # the nope part of the queries never sees positions: with zero rope weights, MLA ignores position
    torch.manual_seed(0)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    q_rows = attn.wq.weight.view(cfg.n_heads, -1, cfg.dim)
    with torch.no_grad():
        q_rows[:, cfg.qk_nope_head_dim:] = 0
    x = torch.randn(1, 1, cfg.dim)
    outs = [attn(x, cos[p:p + 1], sin[p:p + 1]) for p in (0, 7, 50)]
    assert torch.allclose(outs[0], outs[1], atol=1e-6) and torch.allclose(outs[0], outs[2], atol=1e-6)


def decode(model, tokens, absorb, prefill=4):
    cache = model.new_cache(tokens.shape[0], tokens.shape[1], absorb=absorb)
    outs = [model(tokens[:, :prefill], cache=cache).logits]
    for t in range(prefill, tokens.shape[1]):
        outs.append(model(tokens[:, t:t + 1], cache=cache).logits)
    assert cache.pos == tokens.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_full_forward_equals_naive_and_absorbed_decode(q_lora_rank):
    cfg = small_cfg(q_lora_rank=q_lora_rank, n_layers=3)
    torch.manual_seed(123)
    model = dsv3.DeepSeekV3(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))  # 4 prefill + 20 decode steps
    with torch.no_grad():
        full = model(tokens).logits
        naive, _ = decode(model, tokens, absorb=False)
        absorbed, _ = decode(model, tokens, absorb=True)
    assert (naive - full).abs().max() <= 1e-4
    assert (absorbed - full).abs().max() <= 1e-4
    assert (absorbed - naive).abs().max() <= 1e-4


def test_cache_holds_only_the_latent(model, cfg):
    tokens = torch.randint(0, cfg.vocab_size, (3, 10))
    with torch.no_grad():
        _, cache = decode(model, tokens, absorb=True)
    assert [t.shape[-1] for t in cache.tensors] == [cfg.kv_lora_rank, cfg.qk_rope_head_dim]
    assert cache.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 4
    assert cfg.cache_values_per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    # what is cached is the normalised latent of each token, recomputable from the hidden state
    attn = model.layers[0].attn
    h = model.layers[0].attn_norm(model.embed(tokens))
    c_kv = attn.kv_norm(attn.wkv_a(h)[..., : cfg.kv_lora_rank])
    assert torch.allclose(cache.c_kv[0], c_kv, atol=1e-6)


def test_left_padding_with_key_mask_matches_unpadded(model, cfg):
    torch.manual_seed(1)
    short = torch.randint(0, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    with torch.no_grad():
        ref, _ = decode(model, short, absorb=True, prefill=2)
        cache = model.new_cache(1, 9, absorb=True)
        cache.key_mask = torch.tensor([[False] * 3 + [True] * 6])
        logits = model(padded, cache=cache).logits[:, 3:]
    assert (logits - ref).abs().max() <= 1e-4


def test_gqa_cache_equals_full():
    cfg = dsv3.ModelConfig.preset("smollm2-135m", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  head_dim=16, dense_inter_dim=96, max_seq_len=64)
    torch.manual_seed(123)
    model = dsv3.DeepSeekV3(cfg).eval()
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens).logits
        inc, cache = decode(model, tokens, absorb=False)
    assert (inc - full).abs().max() <= 1e-4
    assert cache.bytes_per_token() == 2 * 2 * 16 * 2 * 4  # k and v, 2 kv heads x 16, 2 layers, fp32


def test_decode_step_equals_cached_forward_with_padding(model, cfg):
    """decode_step (static shapes: the position is a tensor, attention covers the whole cache under a mask) gives
    the logits and cache contents of forward(tokens, cache=...), also for a left-padded row."""
    torch.manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 14))
    key_mask = torch.ones(2, 14, dtype=torch.bool)
    key_mask[1, :3] = False  # row 1: three padding tokens that no query may see
    with torch.no_grad():
        caches = [model.new_cache(2, 14) for _ in range(2)]
        for c in caches:
            c.key_mask = key_mask
            model(tokens[:, :4], cache=c)
        for t in range(4, 14):
            ref = model(tokens[:, t:t + 1], cache=caches[0]).logits[:, -1]
            got = model.decode_step(tokens[:, t:t + 1], caches[1])
            assert (got - ref).abs().max() <= 1e-5
    assert caches[1].pos == 14
    for a, b in zip(caches[0].tensors, caches[1].tensors, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_decode_step_refuses_what_it_cannot_do(model, cfg):
    with pytest.raises(ValueError, match="absorbed cache"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), model.new_cache(1, 4, absorb=False))
    with pytest.raises(ValueError, match=r"tokens of shape \(batch, 1\)"):
        model.decode_step(torch.zeros(1, 2, dtype=torch.long), model.new_cache(1, 4))
    cache = model.new_cache(1, 1)
    model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache's free space"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)
