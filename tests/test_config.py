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


def test_fields_with_flags_of_their_own_are_named_by_them():
    """FIELD_FLAGS: the fields the command line sets with their own flag, so an error names that flag (argparse's
    dest, mtp_layers, is not the field's name, so the CLIs cannot derive it)."""
    from dataclasses import fields

    from dsv3.config import FIELD_FLAGS, SettingError

    assert set(FIELD_FLAGS) <= {f.name for f in fields(dsv3.ModelConfig)}
    with pytest.raises(SettingError) as e:
        dsv3.ModelConfig.preset("tiny", n_mtp_layers=-1)
    assert e.value.named(FIELD_FLAGS.get) == "--mtp-layers must be >= 0, got -1"


def test_info_cli(capsys):
    assert main(["info", "--preset", "174m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == counts("174m")
    assert info["cache_values_per_token_per_layer"] == 512 + 64
    assert main(["info", "--preset", "174m"]) == 0
    assert "172,491,648" in capsys.readouterr().out


def test_info_shows_only_the_fields_that_apply(capsys):
    def shown(preset):
        assert main(["info", "--preset", preset]) == 0
        return {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    ")}

    mla_moe, gqa_dense = shown("174m"), shown("smollm2-135m")
    assert {"kv_lora_rank", "qk_rope_head_dim", "n_routed_experts", "score_func", "n_dense_layers"} <= mla_moe
    assert not mla_moe & {"n_kv_heads", "head_dim", "dense_inter_dim", "n_limited_groups"}
    assert {"n_kv_heads", "head_dim", "dense_inter_dim"} <= gqa_dense
    assert not gqa_dense & {"kv_lora_rank", "q_lora_rank", "n_routed_experts", "aux_loss_coef", "n_dense_layers"}
    cfg = dsv3.ModelConfig.preset("tiny", n_dense_layers=1, n_expert_groups=2, n_limited_groups=1, yarn_factor=4.0,
                                  n_mtp_layers=1)
    fields = {k for group in cfg.sections().values() for k in group}
    assert {"dense_inter_dim", "n_limited_groups", "group_score", "yarn_beta_fast", "mtp_loss_weight"} <= fields
    plain = {k for g in dsv3.ModelConfig.preset("tiny").sections().values() for k in g}
    assert "n_mtp_layers" in plain and not plain & {"yarn_beta_fast", "mtp_loss_weight"}
    gqa = {k for g in dsv3.ModelConfig.preset("smollm2-135m").sections().values() for k in g}
    assert fields | gqa == set(cfg.to_dict())  # every field shows where it applies


def test_help_shows_every_default():
    from dsv3.__main__ import HelpFormatter, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"info", "train", "generate", "export-hf", "bench"}
    for name, p in sub.choices.items():
        assert p.formatter_class is HelpFormatter
        required = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
        for a in p._actions:
            if a.option_strings and not a.required and a not in required and a.nargs != 0 and a.dest != "help":
                text = HelpFormatter(name)._get_help_string(a)
                assert "default" in text, f"{name} {a.option_strings[0]}: {text}"
        assert "(default: " in p.format_help() or name == "export-hf"  # (it has required options only)
