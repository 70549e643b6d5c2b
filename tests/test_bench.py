"""The benchmark harness (benchmarks/bench.py) on tiny shapes: FLOP formulas, interleaving, the dispatch section,
the decode modes, the HF twin, result fields and the CLI, also where no harness is installed. No timing assertions."""

import json

import pytest
import torch

import dsv3
import dsv3.__main__ as cli
from dsv3.__main__ import bench_harness, main

bench = bench_harness()


def test_flop_formulas_by_hand():
    cfg = dsv3.ModelConfig.preset("tiny")  # 4 layers, 4 heads, qk 32 + 16, v 32
    assert bench.attention_flops_per_token(cfg, 256) == 6 * 4 * 4 * 256 * (48 + 32)
    assert bench.train_flops_per_token(cfg, 1000, 256) == 6000 + 6 * 4 * 4 * 256 * 80
    shapes = bench.gemm_shapes(dsv3.ModelConfig.preset("174m"), 512)
    assert shapes["head"] == (512, 576, 50257) and shapes["wkv_a"] == (512, 576, 576)
    assert shapes["wkv_b"] == (512, 512, 9 * 128) and shapes["expert_w1"] == (128, 576, 184)


def test_interleaved_counts_rounds_and_caps():
    calls = []
    res = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1,
                            cap={"b": 1})
    assert calls.count("a") == 4 and calls.count("b") == 2  # warm-up + reps (b capped at one timed run)
    assert len(res["a"]["times"]) == 3 and len(res["b"]["times"]) == 1
    assert res["a"]["median"] == sorted(res["a"]["times"])[1] and res["a"]["spread"] >= 0


def test_dispatch_section_fields():
    d = bench.bench_dispatch(reps=1, tokens=32)
    assert d["max_abs_diff"] < 1e-5 and d["grouped_ms"] > 0 and d["naive_ms"] > 0
    assert d["speedup"] == pytest.approx(d["naive_ms"] / d["grouped_ms"])


def test_greedy_modes_agree(model, cfg):
    prompt = torch.randint(0, cfg.vocab_size, (1, 5))
    a = bench.greedy(model, prompt, 6, "absorbed")
    assert a.shape == (1, 11) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, bench.greedy(model, prompt, 6, "naive"))
    assert torch.equal(a, bench.greedy(model, prompt, 6, "none"))
    assert torch.equal(a, bench.greedy(model, prompt, 6, "absorbed+compile"))


def test_train_section_against_hf_twin():
    pytest.importorskip("transformers")
    peaks = {"peak_float32_gflops": 100.0, "peak_bfloat16_gflops": 400.0}
    row = bench.bench_train(("tiny",), ("fp32",), hf=True, reps=1, peaks=peaks, shapes={"tiny": (1, 16)})["tiny"]
    assert row["hf_max_abs_logit_diff"] < 1e-4  # same weights, same function
    v = row["variants"]
    assert set(v) == {"dsv3/fp32", "reference/fp32", "hf/fp32"}  # kernels on, kernels off, transformers
    ours = v["dsv3/fp32"]
    assert ours["tokens_per_s"] == pytest.approx(16 / ours["step_s"])
    assert ours["gflops"] == pytest.approx(ours["tokens_per_s"] * row["flops_per_token"] / 1e9)
    # the peak: the faster of the given one and the square-GEMM probe timed between the steps
    assert row["probe_gflops"]["fp32"] > 0 and row["peak_gflops"]["fp32"] == max(100.0, row["probe_gflops"]["fp32"])
    assert ours["fraction_of_peak"] == pytest.approx(ours["gflops"] / row["peak_gflops"]["fp32"])
    assert ours["vs_hf"] == pytest.approx(ours["tokens_per_s"] / v["hf/fp32"]["tokens_per_s"])
    ref = v["reference/fp32"]
    assert ref["vs_hf"] == pytest.approx(ref["tokens_per_s"] / v["hf/fp32"]["tokens_per_s"])


def test_decode_section_cache_bytes_and_hf_tokens():
    pytest.importorskip("transformers")
    row = bench.bench_decode(("tiny",), hf=True, reps=1, bandwidth_gbs=10.0, new=4)["tiny"]
    cfg = bench.bench_config("tiny")
    m = row["methods"]
    assert m["absorbed"]["cache_bytes_per_token_per_layer"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert m["no_cache"]["cache_bytes_per_token_per_layer"] == 0
    assert m["hf_generate"]["cache_bytes_per_token_per_layer"] > 0
    assert row["same_tokens_as_absorbed"] == {"absorbed+compile": True, "naive": True, "reference": True,
                                              "hf_generate": True}
    assert m["absorbed+compile"]["cache_bytes_per_token_per_layer"] == m["absorbed"]["cache_bytes_per_token_per_layer"]
    res = {"machine": bench.machine(), "decode": {"tiny": row}, "wall_s": 1.0}
    assert row["first_compiled_run_s"] > 0 and "absorbed+compile" in bench.table(res)
    assert row["bandwidth_floor_tokens_per_s"] == pytest.approx(10e9 / (row["active_params"] * 4))


def test_cli_table_json_and_bad_sections(capsys, tmp_path):
    assert main(["bench", "--sections", "nope"]) == 2
    assert "--sections" in capsys.readouterr().err
    assert main(["bench", "--precisions", "fp16"]) == 2 and main(["bench", "--shape", "16by1024"]) == 2
    assert main(["bench", "--presets", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    res = {"machine": bench.machine(), "dispatch": bench.bench_dispatch(reps=1, tokens=16), "wall_s": 1.0}
    assert "MoE dispatch" in bench.table(res) and json.loads(json.dumps(res))["machine"]["torch"] == torch.__version__


def test_without_the_harness_bench_answers_one_line(monkeypatch, capsys):
    """An installed wheel has no benchmarks/: `python -m dsv3 bench` with any flags says so in one line."""
    monkeypatch.setattr(cli, "bench_harness", lambda: None)
    assert main(["bench", "--quick", "--presets", "tiny", "-h"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "benchmarks/bench.py" in err and "pip install -e ." in err
