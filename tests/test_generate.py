"""Generation: cache paths agree, sampling filters and seeds, streaming and UTF-8, stop strings,
left-padded batches, the routing trace, refused inputs, and the `generate` CLI."""

import math
import os
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.data import EOT, get_tokenizer
from dsv3.generate import generate_tokens, sample
from dsv3.model import ModelOutput

_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_TIKTOKEN)

PROMPT = "ROMEO: speak"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> dsv3.ModelConfig:
    # Untied random weights give varied greedy text (a tied random model just repeats its input token).
    return dsv3.ModelConfig.preset("tiny", **{"n_layers": 2, "tie_embeddings": False, "max_seq_len": 128, **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv3.DeepSeekV3(tiny()).eval()


class Scripted(dsv3.DeepSeekV3):
    """Runs the real model (cache and all) but forces the i-th new token to be script[i]."""

    def __init__(self, cfg, n_prompt: int, script: list[int]):
        super().__init__(cfg)
        self.n_prompt, self.script = n_prompt, script

    def forward(self, tokens, targets=None, cache=None, **kw):
        out = super().forward(tokens, targets, cache, **kw)
        i = (cache.pos if cache is not None else tokens.shape[1]) - self.n_prompt
        logits = torch.full_like(out.logits, -1e4)
        logits[:, -1, self.script[min(i, len(self.script) - 1)]] = 0.0
        return ModelOutput(logits=logits)


def scripted(text_or_ids, prompt=PROMPT) -> Scripted:
    """A model that continues `prompt` with the given text (or ids), then <|endoftext|>."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    torch.manual_seed(0)
    return Scripted(tiny(n_layers=1), len(enc.encode_ordinary(prompt) or [EOT]), ids + [EOT]).eval()


# --- the three cache paths ---

def test_greedy_is_identical_with_absorbed_naive_and_no_cache(model):
    enc = get_tokenizer()
    runs = {c: dsv3.generate(model, PROMPT, 80, temperature=0, cache=c, return_trace=True)
            for c in ("absorbed", "naive", "none")}
    ref = runs["absorbed"]
    assert ref.finish_reason == "length" and len(ref.tokens) - ref.n_prompt == 80
    assert len(set(ref.tokens[ref.n_prompt:])) > 20  # a varied sequence, not one repeated token
    for c, g in runs.items():
        assert g.tokens == ref.tokens, c
        assert g.text == ref.text == enc.decode(ref.tokens[ref.n_prompt:])
        assert torch.equal(g.expert_ids, ref.expert_ids), c
    # the no-cache tokens are also what a plain full forward predicts at every position
    with torch.inference_mode():
        logits = model(torch.tensor([ref.tokens])).logits[0, ref.n_prompt - 1:-1]
    assert logits.argmax(-1).tolist() == ref.tokens[ref.n_prompt:]


def test_generate_tokens_allocates_one_cache_and_feeds_one_position_per_step(model):
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: calls.append(args[0].shape[1]), with_kwargs=True)
    try:
        ids = torch.tensor([get_tokenizer().encode_ordinary(PROMPT)])
        out = list(generate_tokens(model, ids, 10, temperature=0))
    finally:
        hook.remove()
    assert len(out) == 10
    assert calls == [ids.shape[1]] + [1] * 9  # prefill once, then one token per forward


# --- sampling ---

def test_seeded_sampling_is_reproducible_and_differs_across_seeds(model):
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = dsv3.generate(model, PROMPT, 24, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    torch.manual_seed(2)
    assert dsv3.generate(model, PROMPT, 24, temperature=1.0, seed=7) == a
    assert dsv3.generate(model, PROMPT, 24, temperature=1.0, seed=torch.Generator().manual_seed(7)) == a
    others = {dsv3.generate(model, PROMPT, 24, temperature=1.0, seed=s) for s in (8, 9)}
    assert a not in others and len(others) == 2


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = dsv3.generate(model, PROMPT, 40, temperature=0)
    assert dsv3.generate(model, PROMPT, 40, temperature=1.5, top_k=1, seed=3) == greedy
    assert dsv3.generate(model, PROMPT, 40, temperature=1.5, top_p=1e-6, seed=3) == greedy
    assert dsv3.generate(model, PROMPT, 40, temperature=1.5, seed=3) != greedy


def test_sample_keeps_only_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 3}
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it -> {1, 3}; 0.81 also needs the 0.15
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 3}
    assert set(sample(logits, 1.0, top_p=0.81, generator=g).tolist()) == {1, 2, 3}
    freq = torch.bincount(sample(logits, 1.0, generator=g), minlength=4) / 2000
    assert torch.allclose(freq, logits[0].exp(), atol=0.04)  # unfiltered sampling follows softmax
    assert sample(logits[:1], 0.0).item() == 1


# --- text: streaming, UTF-8, stop strings ---

def test_stream_concatenates_to_generate(model):
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=50, seed=5), dict(temperature=0, stop=" the")):
        pieces = list(dsv3.stream(model, PROMPT, 40, **kw))
        assert len(pieces) > 1
        assert "".join(pieces) == dsv3.generate(model, PROMPT, 40, **kw)
        # on_text sees the same growing text that stream yields, while generate also returns the trace
        seen = []
        g = dsv3.generate(model, PROMPT, 40, return_trace=True, on_text=seen.append, **kw)
        assert [t for i, t in enumerate(seen) if t and (i == 0 or t != seen[i - 1])] == \
            ["".join(pieces[:i + 1]) for i in range(len(pieces))]
        assert seen[-1] == g.text


def test_utf8_character_split_across_tokens_is_held_until_complete():
    enc = get_tokenizer()
    clef = enc.encode_ordinary("\U0001d11e")  # one character, three byte-level tokens
    assert len(clef) == 3
    m = scripted(clef + enc.encode_ordinary(" ok"))
    calls = []
    hook = m.register_forward_pre_hook(lambda *a: calls.append(1))
    first = next(dsv3.stream(m, PROMPT, 20))
    hook.remove()
    assert first == "\U0001d11e" and len(calls) == 3  # out as soon as its 3rd token is sampled, not later
    pieces = list(dsv3.stream(m, PROMPT, 20))
    assert "".join(pieces) == "\U0001d11e ok" and pieces[0] == "\U0001d11e"
    assert all("\ufffd" not in p for p in pieces)
    g = dsv3.generate(m, PROMPT, 20, return_trace=True)
    assert g.finish_reason == "eot" and g.text == "\U0001d11e ok"
    assert g.token_texts[g.n_prompt:] == ["", "", "\U0001d11e", " ok"]
    assert "".join(g.token_texts) == PROMPT + g.text
    # cut off mid-character by max_new_tokens: the partial bytes become U+FFFD, as tokenizer.decode does
    assert dsv3.generate(m, PROMPT, 2) == enc.decode(clef[:2]) == "\ufffd"
    assert "".join(dsv3.stream(m, PROMPT, 2)) == "\ufffd"


def test_stop_strings_cut_the_text_and_streaming_holds_back_a_partial_match():
    m = scripted("Good night,\n\nsweet prince.\n\nJULIET:")
    g = dsv3.generate(m, PROMPT, 30, stop=["\n\n", "zzz"], return_trace=True)
    assert g.text == "Good night," and g.finish_reason == "stop"
    pieces = list(dsv3.stream(m, PROMPT, 30, stop="\n\n"))
    assert "".join(pieces) == "Good night,"
    assert dsv3.generate(m, PROMPT, 30, stop="prince") == "Good night,\n\nsweet "
    assert dsv3.generate(m, PROMPT, 30) == "Good night,\n\nsweet prince.\n\nJULIET:"


def test_endoftext_stops_and_an_empty_prompt_starts_from_it():
    m = scripted("To be", prompt="")
    g = dsv3.generate(m, "", 20, return_trace=True)
    assert g.tokens[0] == EOT and g.n_prompt == 1 and g.text == "To be" and g.finish_reason == "eot"
    assert len(g.tokens) == 1 + len(get_tokenizer().encode_ordinary("To be"))  # the final EOT is not kept


# --- batches ---

def test_left_padded_batch_equals_one_prompt_at_a_time(model):
    prompts = ["ROMEO:", "", "JULIET: O Romeo, Romeo, wherefore art thou", "A plague o' both your houses"]
    for cache in ("absorbed", "none"):  # "none" masks the padding through a throwaway cache
        batched = dsv3.generate(model, prompts, 24, temperature=0, cache=cache, return_trace=True)
        for p, b in zip(prompts, batched, strict=True):
            one = dsv3.generate(model, p, 24, temperature=0, cache=cache, return_trace=True)
            assert b.tokens == one.tokens, (cache, p)
            assert b.text == one.text
            assert torch.equal(b.expert_ids, one.expert_ids)
            torch.testing.assert_close(b.gates, one.gates, atol=1e-5, rtol=1e-4)
    assert dsv3.generate(model, prompts[:2], 8, temperature=0) == [dsv3.generate(model, p, 8, temperature=0)
                                                                   for p in prompts[:2]]


def test_compiled_decoding_equals_eager_in_one_graph_for_all_blocks(model):
    """compile=True: the same tokens, routing and gates as eager decoding (one prompt, and a left-padded batch),
    from one compiled graph that every block shares (and one for the head), with no graph break and no recompile
    per position."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    prompts = ["JULIET: O Romeo, Romeo, wherefore art thou", "ROMEO:"]
    for graphs, batch in ((2, prompts[:1]), (4, prompts)):  # 2 blocks x 23 one-token steps: one graph, and the head
        ref = dsv3.generate(model, batch, 24, temperature=0, return_trace=True)
        got = dsv3.generate(model, batch, 24, temperature=0, return_trace=True, compile=True)
        for a, b in zip(ref, got, strict=True):
            assert a.tokens == b.tokens and a.text == b.text
            assert torch.equal(a.expert_ids, b.expert_ids)
            torch.testing.assert_close(a.gates, b.gates, atol=1e-5, rtol=1e-4)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the batch of two: two more
    assert not torch._dynamo.utils.counters["graph_break"]
    assert dsv3.generate(model, prompts[0], 24, temperature=0, compile=True) == ref[0].text


def test_compiled_decoding_outlives_dynamos_graph_limit(model):
    """A session meets many shapes and thread counts (a notebook, the playground, this suite): compiled decoding
    keeps one graph per combination beyond dynamo's recompile limit instead of failing (fullgraph makes hitting
    the limit an error). Here the limit is 1 and three thread counts need three graphs of each function."""
    import torch._dynamo

    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    ref = dsv3.generate(model, "ROMEO:", 4, temperature=0)
    with torch._dynamo.config.patch(recompile_limit=1):
        for threads in (1, 2, 3):  # compiled graphs are guarded on the thread count (conftest restores it)
            torch.set_num_threads(threads)
            assert dsv3.generate(model, "ROMEO:", 4, temperature=0, compile=True) == ref
    assert torch._dynamo.config.recompile_limit == limit  # the session's own limit again


def test_rows_finish_independently(model):
    prompts = ["ROMEO:", "JULIET: O Romeo"]
    alone = [dsv3.generate(model, p, 30, temperature=0) for p in prompts]
    stop = alone[0][10:14]  # a string the first row produces halfway and the second never does
    assert stop not in alone[1]
    out = dsv3.generate(model, prompts, 30, temperature=0, stop=stop, return_trace=True)
    assert [g.finish_reason for g in out] == ["stop", "length"]
    assert [g.text for g in out] == [alone[0][:alone[0].index(stop)], alone[1]]
    assert len(out[1].tokens) == out[1].n_prompt + 30 == out[1].expert_ids.shape[1]


# --- routing trace ---

def test_routing_trace_covers_every_token_and_matches_the_gates():
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(tiny(n_layers=3, n_dense_layers=1, score_func="sigmoid", route_scale=2.5)).eval()
    g = dsv3.generate(m, PROMPT, 12, temperature=0, return_trace=True)
    cfg, n = m.cfg, len(g.tokens)
    assert g.expert_ids.shape == g.gates.shape == (2, n, cfg.n_activated_experts)
    assert g.expert_ids.dtype == torch.int64 and g.gates.dtype == torch.float32
    torch.testing.assert_close(g.gates.sum(-1), torch.full((2, n), 2.5))  # sigmoid: renormalised * route_scale
    # the same routing as one full forward, recomputed from the router inputs
    inputs = []
    hooks = [moe.gate.register_forward_hook(lambda mod, args, out: inputs.append(args[0])) for moe in m.moe_layers()]
    try:
        with torch.inference_mode():
            m(torch.tensor([g.tokens]))
    finally:
        for h in hooks:
            h.remove()
    for layer, (moe, x) in enumerate(zip(m.moe_layers(), inputs, strict=True)):
        scores = (x.float() @ moe.gate.weight.detach().float().T).sigmoid()  # eq. 15
        assert torch.equal(scores.topk(2, dim=-1).indices.sort(-1).values, g.expert_ids[layer].sort(-1).values)
        picked = scores.gather(1, g.expert_ids[layer])
        torch.testing.assert_close(g.gates[layer], 2.5 * picked / picked.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    top = g.top_experts()
    assert top.shape == (2, n) and torch.equal(top, g.expert_ids.gather(-1, g.gates.argmax(-1, keepdim=True))[..., 0])
    assert all(moe.gate.observers == [] for moe in m.moe_layers())  # the trace's observers are detached


def test_dense_gqa_baseline_generates_with_an_empty_trace():
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset("smollm2-135m", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                  dense_inter_dim=64, max_seq_len=64, tie_embeddings=False)
    m = dsv3.DeepSeekV3(cfg).eval()
    runs = [dsv3.generate(m, PROMPT, 30, temperature=0, cache=c, return_trace=True) for c in ("absorbed", "none")]
    assert runs[0].tokens == runs[1].tokens and len(set(runs[0].tokens)) > 10
    n = len(runs[0].tokens)
    assert runs[0].expert_ids.shape == runs[0].gates.shape == (0, n, 0) and runs[0].top_experts().shape == (0, n)


def test_generation_leaves_training_state_alone(model):
    model.train()
    try:
        dsv3.generate(model, PROMPT, 4, temperature=0)
        assert model.training
        assert all(moe.gate.step_load.sum() == 0 for moe in model.moe_layers())
    finally:
        model.eval()


def test_max_new_tokens_zero_returns_nothing(model):
    g = dsv3.generate(model, PROMPT, 0, return_trace=True)
    assert g.text == "" and g.finish_reason == "length" and len(g.tokens) == g.n_prompt
    assert g.expert_ids.shape[1] == g.n_prompt


# --- refused inputs ---

L = tiny().max_seq_len
N_PROMPT = len(get_tokenizer().encode_ordinary(PROMPT))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), r"temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), r"temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), r"temperature must be a finite number >= 0"),
    (dict(top_k=-1), r"top_k must be an int in \[0, vocab_size=50257\]"),
    (dict(top_k=50258), r"top_k must be an int in \[0, vocab_size=50257\]"),
    (dict(top_k=2.5), r"top_k must be an int"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an int in \[0, max_seq_len - prompt tokens"),
    (dict(max_new_tokens=L - N_PROMPT + 1), rf"max_new_tokens .* = {L - N_PROMPT}\], got {L - N_PROMPT + 1}"),
    (dict(prompt=" the" * (L + 1)), rf"prompt is {L + 1} tokens; it must be at most max_seq_len={L}"),
    (dict(prompt=["a", 3]), r"prompt must be a string or a non-empty list of strings"),
    (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings"),
    (dict(cache="fast"), r"cache must be one of 'absorbed', 'naive', 'none'"),
    (dict(cache="naive", compile=True), r"compile=True needs an MLA model and cache='absorbed'"),
    (dict(compile="yes"), r"compile must be True or False"),
    (dict(stop=""), r"stop must be a non-empty string"),
    (dict(seed=-1), r"seed must be None, an int >= 0 or a torch.Generator"),
    (dict(seed="1", temperature=0), r"seed must be None, an int >= 0 or a torch.Generator"),
])
def test_bad_inputs_are_refused_with_the_parameter_and_range(model, kwargs, match):
    kwargs = {"prompt": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        dsv3.generate(model, **kwargs)
    if isinstance(kwargs["prompt"], str):  # stream checks before the first piece is requested
        with pytest.raises(ValueError, match=match):
            dsv3.stream(model, **kwargs)


def test_the_longest_allowed_generation_fills_max_seq_len(model):
    g = dsv3.generate(model, PROMPT, L - N_PROMPT, temperature=0, return_trace=True)
    assert len(g.tokens) == L == g.expert_ids.shape[1]
    assert dsv3.generate(model, " the" * L, 0) == ""  # a prompt of exactly max_seq_len tokens is accepted


# --- command line ---

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(tiny(n_layers=1))
    return dsv3.save_checkpoint(tmp_path_factory.mktemp("run"), m, step=0), m


def test_cli_generate_prints_what_generate_returns(checkpoint, capsys):
    from dsv3.__main__ import main

    path, m = checkpoint
    args = ["generate", "--checkpoint", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "12",
            "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95", "--seed", "1", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    want = "ROMEO:" + dsv3.generate(m.eval(), "ROMEO:", 12, temperature=0.8, top_k=50, top_p=0.95, seed=1)
    assert out == want + "\n"
    for extra in (["--stream"], ["--stream", "--no-cache"], ["--naive-cache"], ["--stream", "--compile"]):
        assert main(args + extra) == 0
        assert capsys.readouterr().out == want + "\n", extra
    assert main(args + ["--compile", "--naive-cache"]) == 2
    assert "compile=True needs an MLA model and cache='absorbed'" in capsys.readouterr().err


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "junk.bin").write_bytes(b"\0junk") and d / "junk.bin", "not a dsv3 checkpoint"),
])
def test_cli_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, make, match):
    from dsv3.__main__ import main

    assert main(["generate", "--checkpoint", str(make(tmp_path)), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint") and match in err and err.count("\n") == 1


def test_cli_corrupt_weights_are_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    import shutil

    from dsv3.__main__ import main

    bad = tmp_path / "step_000000"
    shutil.copytree(checkpoint[0], bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint") and err.count("\n") == 1


def test_cli_bad_sampling_argument_is_exit_2(checkpoint, capsys):
    from dsv3.__main__ import main

    assert main(["generate", "--checkpoint", str(checkpoint[0]), "--top-p", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --top-p must be in (0, 1]")
    assert main(["generate", "--checkpoint", str(checkpoint[0]), "--max-new-tokens", "9999", "--stream"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-new-tokens must be an int in [0, ")


def test_cli_best_uses_the_runs_best_checkpoint(checkpoint, tmp_path, capsys):
    from dsv3.__main__ import main

    path, m = checkpoint
    torch.manual_seed(1)
    other = dsv3.DeepSeekV3(m.cfg)
    dsv3.save_checkpoint(tmp_path, m, step=3, best=True)
    dsv3.save_checkpoint(tmp_path, other, step=5)  # newer but not the best
    args = ["generate", "--checkpoint", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature",
            "0"]
    assert main(args + ["--best"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + dsv3.generate(m.eval(), "ROMEO:", 8, temperature=0) + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out == "ROMEO:" + dsv3.generate(other.eval(), "ROMEO:", 8, temperature=0) + "\n"
    assert main(args[:2] + [str(tmp_path / "nowhere"), "--best"]) == 2
    assert main(["generate", "--checkpoint", str(path.parent), "--best"]) == 2
    assert "error: --checkpoint: no best checkpoint in" in capsys.readouterr().err


def kernel_calls(fn) -> list[str]:
    """The functions of dsv3/kernels/ (its switch in __init__.py excepted) that Python entered while fn ran."""
    import sys

    here = os.path.join("dsv3", "kernels", "")
    seen = []

    def profile(frame, event, arg):
        f = frame.f_code.co_filename
        if event == "call" and here in f and not f.endswith("__init__.py"):
            seen.append(f"{os.path.basename(f)}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def test_the_kernels_switch_covers_training_and_plain_and_speculative_decoding():
    """With the kernels off, no function of dsv3/kernels/ runs in a training step, in plain decoding or in speculative
    decoding (the default path does call them: the count can fail), and compile=True is refused in one line."""
    from dsv3 import kernels

    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny(vocab_size=512, n_mtp_layers=1))
    x = torch.randint(0, 512, (2, 24))
    prompt = torch.randint(0, 512, (2, 5))

    def train_step():
        model.train()
        model(x[:, :-1], x[:, 1:], return_logits=False).loss.backward()

    def decode(**kw):
        return lambda: list(generate_tokens(model, prompt, 6, temperature=0, **kw))

    runs = {"train": train_step, "plain": decode(), "speculative": decode(speculative=True),
            "speculative naive": decode(speculative=True, cache="naive")}
    assert kernel_calls(runs["train"]) and kernel_calls(runs["speculative"])  # on by default: the kernels run
    with kernels.disabled():
        for name, fn in runs.items():
            assert kernel_calls(fn) == [], name
        for kw in ({}, {"speculative": True}):
            with pytest.raises(ValueError, match="kernels.*switched off.*decode without compile"):
                generate_tokens(model, prompt, 4, compile=True, **kw)
        with pytest.raises(ValueError, match="switched off"):
            model.decode(prompt, model.new_cache(2, 8), compiled=True)
