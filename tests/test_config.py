import json

import pytest
import torch

import dsv3
from dsv3.__main__ import main


def counts(preset):
    with torch.device("meta"):
        return dsv3.count_params(dsv3.DeepSeekV3(dsv3.ModelConfig.preset(preset)))


def test_174m_total_within_1_percent_and_active_published():
    c = counts("174m")
    assert abs(c["total"] - 174_000_000) / 174_000_000 < 0.01
    # active = everything except the 6 routed experts a token skips in each of the 30 MoE layers
    cfg = dsv3.ModelConfig.preset("174m")
    skipped = 30 * (8 - 2) * 3 * cfg.dim * cfg.moe_inter_dim
    assert c["active"] == c["total"] - skipped
    assert 110e6 < c["active"] < 120e6  # the seed claimed ~35M


def test_smollm2_total_within_1_percent():
    c = counts("smollm2-135m")
    assert abs(c["total"] - 135_000_000) / 135_000_000 < 0.01
    assert c["active"] == c["total"] and c["routed_experts"] == 0


def test_counts_match_numel_with_tied_embeddings():
    cfg = dsv3.ModelConfig.preset("tiny")
    m = dsv3.DeepSeekV3(cfg)
    assert dsv3.count_params(m)["total"] == sum(p.numel() for p in m.parameters())  # tied weight once
    assert m.head.weight is m.embed.weight
    untied = dsv3.DeepSeekV3(cfg.replace(tie_embeddings=False))
    assert dsv3.count_params(untied)["total"] == dsv3.count_params(m)["total"] + cfg.vocab_size * cfg.dim


def test_overrides_and_round_trip():
    cfg = dsv3.ModelConfig.preset("tiny", n_layers=2)
    assert cfg.n_layers == 2 and cfg.vocab_size == 50257
    assert dsv3.ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: dsv3.ModelConfig.preset("gpt5"), "unknown preset 'gpt5'"),
        (lambda: dsv3.ModelConfig.preset("tiny", n_layer=3), "n_layer"),
        (lambda: dsv3.ModelConfig.preset("tiny", n_activated_experts=9), "n_routed_experts=8"),
        (lambda: dsv3.ModelConfig.preset("tiny", n_activated_experts=0), "n_activated_experts"),
        (lambda: dsv3.ModelConfig.preset("tiny", score_func="relu"), "score_func"),
        (lambda: dsv3.ModelConfig.preset("tiny", qk_rope_head_dim=7), "qk_rope_head_dim"),
        (lambda: dsv3.ModelConfig.preset("smollm2-135m", n_kv_heads=4), "n_kv_heads"),
        (lambda: dsv3.ModelConfig.preset("tiny", n_expert_groups=3), "n_expert_groups"),
        (lambda: dsv3.ModelConfig.preset("tiny", dim=0), "dim must be >= 1"),
        (lambda: dsv3.ModelConfig.preset("tiny", n_layers=2.5), "n_layers must be an int"),
    ],
)
def test_bad_configs_name_the_problem(call, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_info_cli(capsys):
    assert main(["info", "--preset", "174m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == counts("174m")
    assert info["cache_values_per_token_per_layer"] == 512 + 64
    assert main(["info", "--preset", "174m"]) == 0
    assert "172,491,648" in capsys.readouterr().out
