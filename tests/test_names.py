"""The transformers name map: every parameter element is in exactly one file tensor, each rewrite is undone
exactly by its inverse and yields the file's shape, and the rope order pairs our halves as DeepSeek's files do.
(That transformers computes our logits from the map is tests/test_export_hf.py; the file round trip test_hf.py.)"""

import pytest
import torch
from conftest import small_cfg

import dsv3
from dsv3.names import hf_weights, latent_scale, rope_perm

CONFIGS = {
    "mla-moe": dict(),
    "mla-qlora-mtp-untied": dict(q_lora_rank=24, n_mtp_layers=2, tie_embeddings=False, n_dense_layers=1,
                                 n_layers=3, score_func="sigmoid"),
    "mla-no-shared": dict(n_shared_experts=0),
    "mla-dense": dict(ffn="dense"),
    "gqa-dense": dict(attn="gqa", ffn="dense", n_kv_heads=2, head_dim=16),
}


def model_of(name, **extra):
    torch.manual_seed(0)
    return dsv3.DeepSeekV3(small_cfg(**CONFIGS[name], **extra))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_element_is_in_exactly_one_file_tensor(name):
    model = model_of(name)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for w in hf_weights(model, rope_pairs=True, latent_scale=1.0, router_bias=True).values():
            w.ours.add_(1)
    counts = {n: set(p.unique().tolist()) for n, p in model.named_parameters()}
    assert {n: c for n, c in counts.items() if c != {1.0}} == {}


@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("name", CONFIGS)
def test_each_rewrite_is_undone_exactly_and_gives_the_file_shape(name, pairs):
    model = model_of(name, norm_eps=1e-2)  # a latent rescale s = 1e-2, written one precision wider
    s = latent_scale(model.cfg)
    assert s != 1
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        weights = hf_weights(model, rope_pairs=pairs, latent_scale=s, router_bias=True)
        for key, w in weights.items():
            f = w.to_hf(w.ours) if w.to_hf else w.ours
            assert tuple(f.shape) == w.shape, key
            back = w.from_hf(f) if w.from_hf else f
            assert torch.equal(back.to(w.ours.dtype), w.ours), key


def test_rope_perm_lays_our_halves_out_as_adjacent_pairs():
    d = 8
    x = torch.arange(d)  # our layout: dim i rotates with dim i + d/2
    y = x[rope_perm(d)]  # DeepSeek's layout: dim 2i rotates with dim 2i + 1
    assert [(int(a), int(b)) for a, b in y.view(-1, 2)] == [(i, i + d // 2) for i in range(d // 2)]
