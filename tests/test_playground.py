"""playground.py without a browser: the Generate handler streams, routes, respects its bounds and explains errors."""

import html
import os

import pytest
import torch

import dsv3
from dsv3.data import get_tokenizer
from dsv3.playground import Playground, find_checkpoint, show


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny", n_layers=2)).eval()


def test_generate_streams_and_routes(model):
    pg = Playground(model)
    pg.prompt.value, pg.max_new_tokens.value, pg.seed.value = "ROMEO:", 8, 7
    updates = []
    pg.output.observe(lambda ch: updates.append(ch["new"]), names="value")
    pg.on_generate()
    text = pg.output.value
    assert text.startswith("<b>ROMEO:</b>") and len(text) > len("<b>ROMEO:</b>")
    assert len(updates) >= 3  # the prompt, then the text grew piece by piece
    assert all(b.startswith(a) for a, b in zip(updates[1:], updates[2:], strict=False))
    n_prompt = len(get_tokenizer().encode_ordinary("ROMEO:"))
    assert n_prompt < len(pg.tokens) <= n_prompt + 8
    assert pg.top1.shape == (2, len(pg.tokens))
    assert pg.routing.value.count("<span title='expert") == len(pg.tokens)
    assert all(f"expert {e}" in pg.routing.value for e in range(model.cfg.n_routed_experts))  # the legend
    # the same text and routing as dsv3.generate with the same settings
    ref = dsv3.generate(model, "ROMEO:", 8, temperature=pg.temperature.value, top_k=pg.top_k.value,
                        top_p=pg.top_p.value, seed=7, return_trace=True)
    assert text == "<b>ROMEO:</b>" + html.escape(ref.text).replace("\n", "<br>")
    assert torch.equal(pg.top1, ref.top_experts()[:, : len(pg.tokens)])
    first = pg.output.value
    pg.on_generate()
    assert pg.output.value == first  # same seed, same text
    pg.compile.value = True  # compiled decoding: the same text and routing
    pg.on_generate()
    assert pg.output.value == first and torch.equal(pg.top1, ref.top_experts()[:, : len(pg.tokens)])


def test_bounds_and_errors(model):
    pg = Playground(model)
    pg.max_new_tokens.value = 10**6
    assert pg.max_new_tokens.value == min(500, model.cfg.max_seq_len - 1)
    pg.temperature.value = 99
    assert pg.temperature.value == 2.0
    pg.prompt.value = "word " * 300  # longer than max_seq_len: refused with the message, not a traceback
    pg.on_generate()
    assert "error:" in pg.output.value and "max_seq_len" in pg.output.value
    assert not pg.button.disabled


def test_find_checkpoint_and_show(model, tmp_path, monkeypatch):
    monkeypatch.delenv("DSV3_CHECKPOINT", raising=False)
    assert find_checkpoint(tmp_path / "missing") is None
    msg = show(tmp_path / "missing")
    assert "No checkpoint found" in msg.value and "python -m dsv3 train" in msg.value
    old = dsv3.save_checkpoint(tmp_path / "run_a", model, step=1)
    new = dsv3.save_checkpoint(tmp_path / "run_b", model, step=1)
    os.utime(old / "meta.json", (1, 1))  # run_a is older
    assert find_checkpoint(tmp_path) == new
    pg = show(tmp_path)
    assert isinstance(pg, Playground) and "run_b/step_000001" in pg.status.value
    monkeypatch.setenv("DSV3_CHECKPOINT", str(tmp_path / "run_a"))
    assert find_checkpoint(tmp_path) == old
    monkeypatch.setenv("DSV3_CHECKPOINT", str(tmp_path / "nope"))
    assert "Could not use DSV3_CHECKPOINT" in show(tmp_path).value
