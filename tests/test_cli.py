"""The command line as a learner meets it: every bad input is one line on stderr and exit 2 (the offline tokenizer
and corpus included, and in a notebook one line instead of a traceback), `generate` fills the context by default and
reports tokens, tokens/s and the drafts accepted on stderr, `info --checkpoint`."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import depth_rates

import dsv3
from dsv3 import data
from dsv3.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
SHA1 = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # the r50k_base file's name in tiktoken's cache
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> dsv3.ModelConfig:
    return dsv3.ModelConfig.preset("tiny", n_layers=1, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(tiny()).eval()
    return dsv3.save_checkpoint(tmp_path_factory.mktemp("run"), m, step=0).parent, m


@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory):
    torch.manual_seed(1)
    m = dsv3.DeepSeekV3(tiny(n_mtp_layers=1)).eval()
    return dsv3.save_checkpoint(tmp_path_factory.mktemp("mtp"), m, step=0).parent, m


@pytest.fixture(scope="module")
def mtp2_run(tmp_path_factory):
    torch.manual_seed(2)
    m = dsv3.DeepSeekV3(tiny(n_mtp_layers=2)).eval()
    return dsv3.save_checkpoint(tmp_path_factory.mktemp("mtp2"), m, step=0).parent, m


def one_line_error(capsys, argv) -> str:
    """main(argv) exits 2 (returned or raised by argparse) with exactly one line on stderr, starting 'error: '."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- offline: the tokenizer and the corpus ---

def offline_env(tmp_path) -> dict:
    """An environment with an empty tiktoken cache and every HTTP(S) request sent to a closed port."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    (tmp_path / "tiktoken").mkdir()
    return {**env, "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"), "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "DSV3_DATA_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command", ["generate", "train"])
def test_offline_without_the_tokenizer_file_is_one_line_naming_both_fixes(command, run, tmp_path):
    argv = {"generate": ["--checkpoint", str(run[0]), "--prompt", "ROMEO:"],
            "train": ["--steps", "1", "--out", str(tmp_path / "out"), "--threads", "1"]}[command]
    r = subprocess.run([sys.executable, "-m", "dsv3", command, *argv], env=offline_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for words in ("tokenizer", str(tmp_path / "tiktoken"), "connect to the internet once", "TIKTOKEN_CACHE_DIR",
                  data.TOKENIZER_URL, SHA1):
        assert words in r.stderr


def test_info_needs_no_tokenizer(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsv3", "info", "--json"], env=offline_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["preset"] == "tiny", r.stderr


def _no_network(monkeypatch):
    """No HTTP for tiktoken, and neither dsv3's nor tiktoken's in-process copy of the encoding."""
    import requests
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def refuse(*a, **k):
        raise requests.ConnectionError("network blocked by the test")

    monkeypatch.setattr(requests, "get", refuse)
    data.get_tokenizer.cache_clear()


def test_the_named_file_is_the_fix(tmp_path, monkeypatch):
    """The message's advice works: the BPE file saved under the SHA-1 of its URL loads with no network at all."""
    assert hashlib.sha1(data.TOKENIZER_URL.encode()).hexdigest() == SHA1
    shared = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or ROOT.parent / "shared" / "tiktoken") / SHA1
    if not shared.is_file():
        pytest.skip("no cached r50k_base file on this machine")
    _no_network(monkeypatch)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    try:
        with pytest.raises(data.MissingFile, match=SHA1):
            data.get_tokenizer()
        shutil.copyfile(shared, tmp_path / SHA1)
        assert data.get_tokenizer().decode(data.get_tokenizer().encode("ROMEO:")) == "ROMEO:"
    finally:
        data.get_tokenizer.cache_clear()


def test_in_a_notebook_the_missing_tokenizer_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    _no_network(monkeypatch)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    shell = InteractiveShell.instance()
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            result = shell.run_cell("from dsv3.data import check_setup\ncheck_setup(corpus=False)")
    finally:
        data.get_tokenizer.cache_clear()
    assert isinstance(result.error_in_exec, data.MissingFile)
    shown = out.getvalue()
    assert shown.count("\n") == 1 and shown.startswith("MissingFile: the GPT-2 tokenizer") and SHA1 in shown


def test_offline_without_the_corpus_is_one_line(tmp_path, monkeypatch, capsys):
    import urllib.error

    def refuse(url, timeout):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.delenv("DSV3_CORPUS", raising=False)
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    err = one_line_error(capsys, ["train", "--steps", "1", "--out", str(tmp_path / "out")])
    for words in ("Tiny Shakespeare", data.TINY_SHAKESPEARE_URL, "Connection refused", "DSV3_CORPUS",
                  str(tmp_path / "cache")):
        assert words in err
    with pytest.raises(data.MissingFile):
        data.check_setup()


# --- every other bad input: one line, exit 2 ---

LONG = " the" * 300  # > tiny's 256-token context


@pytest.mark.parametrize("argv, words", [
    (["info", "--preset", "nope"], "invalid choice: 'nope'"),
    (["train", "--preset", "nope"], "invalid choice: 'nope'"),
    (["nope"], "invalid choice: 'nope'"),
    (["generate"], "one of the arguments --checkpoint --hf is required"),
    (["generate", "--checkpoint", "RUN", "--temperature", "hot"], "--temperature: invalid float value"),
    (["generate", "--checkpoint", "RUN", "--max-new-tokens", "lots"], "must be an int or 'fill'"),
    (["generate", "--checkpoint", "MISSING"], "--checkpoint: checkpoint"),
    (["generate", "--checkpoint", "RUN", "--best"], "no best checkpoint"),
    (["generate", "--checkpoint", "RUN", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--checkpoint", "RUN", "--top-k", "-1"], "--top-k must be an int in [0, vocab_size=50257]"),
    (["generate", "--checkpoint", "RUN", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "--checkpoint", "RUN", "--max-new-tokens", "-3"], "--max-new-tokens must be an int in [0, "),
    (["generate", "--checkpoint", "RUN", "--prompt", "ROMEO:", "--max-new-tokens", "254"],
     "--max-new-tokens must be an int in [0, max_seq_len - prompt tokens = 256 - 3 = 253], got 254 (leave "
     "--max-new-tokens out to fill the context)"),
    (["generate", "--checkpoint", "RUN", "--prompt", LONG], "--prompt is 300 tokens; it must be at most"),
    (["generate", "--checkpoint", "RUN", "--seed", "-1"], "--seed must be"),
    (["generate", "--checkpoint", "RUN", "--threads", "0"], "--threads must be >= 1"),
    (["generate", "--checkpoint", "RUN", "--stop", ""], "--stop must be a non-empty string"),
    (["generate", "--checkpoint", "RUN", "--prompt-ids", "1,x"], "--prompt-ids must be integers"),
    (["generate", "--checkpoint", "RUN", "--prompt-ids", ","], "--prompt-ids is empty"),
    (["generate", "--checkpoint", "RUN", "--speculative"], "--speculative drafts with the model's multi-token"),
    (["generate", "--checkpoint", "RUN", "--dtype", "float16"], "--dtype goes with --hf"),
    (["generate", "--checkpoint", "RUN", "--device", "nodevice"], "--device 'nodevice' is not a device"),
    (["generate", "--hf", "MISSING"], "--hf: "),
    (["info", "--checkpoint", "MISSING"], "--checkpoint: checkpoint"),
    (["info", "--checkpoint", "RUN", "--best"], "--checkpoint: no best checkpoint"),
    (["info", "--mtp-layers", "-1"], "error: --mtp-layers must be >= 0, got -1"),  # the flag, not the field
    (["train", "--mtp-layers", "-1", "--out", "MISSING"], "error: --mtp-layers must be >= 0, got -1"),
    (["train", "--mtp-weight", "-1", "--out", "MISSING"], "error: --mtp-weight must be >= 0, got -1.0"),
    (["train", "--set", "n_mtp_layers=-1", "--out", "MISSING"], "error: --set: n_mtp_layers must be >= 0"),
    (["train", "--device", "nodevice"], "--device 'nodevice' is not a device"),
    (["train", "--corpus", "MISSING"], "does not exist"),
    (["export-hf", "--checkpoint", "RUN", "--out", "FILE/sub"], "cannot write the export there (Not a directory)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    subst = {"RUN": str(run[0]), "MISSING": str(tmp_path / "missing"), "FILE/sub": str(tmp_path / "file" / "sub")}
    argv = [subst.get(a, a) for a in argv]
    assert words in one_line_error(capsys, argv)


def test_export_hf_names_out_when_it_cannot_write_there(run, tmp_path, capsys):
    """A path through a file, or a file itself: one line naming --out and the problem, not a raw OS error."""
    (tmp_path / "afile").write_text("x")
    sub = tmp_path / "afile" / "sub"
    err = one_line_error(capsys, ["export-hf", "--checkpoint", str(run[0]), "--out", str(sub)])
    assert err == f"error: --out {sub}: cannot write the export there (Not a directory)\n"
    err = one_line_error(capsys, ["export-hf", "--checkpoint", str(run[0]), "--out", str(tmp_path / "afile")])
    assert err == f"error: --out must be a directory, got an existing file: {tmp_path / 'afile'}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused_up_front(run, capsys):
    err = one_line_error(capsys, ["generate", "--checkpoint", str(run[0]), "--device", "cuda"])
    assert "no CUDA device" in err and "--device cpu" in err


# --- generate: fills the context by default, reports on stderr ---

def test_max_new_tokens_fills_the_context_by_default_and_says_so(run, capsys):
    path, m = run
    assert main(["generate", "--checkpoint", str(path), "--prompt", "ROMEO:", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    n_prompt = len(data.get_tokenizer().encode_ordinary("ROMEO:"))
    g = dsv3.generate(m, "ROMEO:", m.cfg.max_seq_len - n_prompt, temperature=0, return_trace=True)
    assert g.finish_reason == "length" and len(g.tokens) == m.cfg.max_seq_len  # (the random model never says EOT)
    assert out == "ROMEO:" + g.text + "\n"
    assert err.startswith(f"{m.cfg.max_seq_len - n_prompt} tokens in ") and err.count("\n") == 1
    assert f"stopped at the end of the context (max_seq_len {m.cfg.max_seq_len} tokens)" in err
    # the same with token ids: all the room there is
    assert main(["generate", "--checkpoint", str(path), "--prompt-ids", "1,2,3", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == m.cfg.max_seq_len - 3 and "end of the context" in err
    # an explicit value that fits is used as given, "fill" is the default spelled out
    assert main(["generate", "--checkpoint", str(path), "--prompt", "ROMEO:", "--temperature", "0",
                 "--max-new-tokens", "7", "--stream"]) == 0
    out, err = capsys.readouterr()
    assert out == "ROMEO:" + dsv3.generate(m, "ROMEO:", 7, temperature=0) + "\n"
    assert err.startswith("7 tokens in ") and "stopped at --max-new-tokens 7" in err
    assert main(["generate", "--checkpoint", str(path), "--prompt", "ROMEO:", "--temperature", "0",
                 "--max-new-tokens", "fill"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + g.text + "\n"


def test_report_counts_tokens_and_the_speculative_drafts(mtp_run, capsys):
    import re

    path, m = mtp_run
    argv = ["generate", "--checkpoint", str(path), "--prompt", "JULIET:", "--max-new-tokens", "24", "--seed", "5",
            "--temperature", "0.9", "--speculative"]
    g = dsv3.generate(m, "JULIET:", 24, temperature=0.9, seed=5, speculative=True, return_trace=True)
    assert g.drafted > 0
    for extra in ([], ["--stream"]):
        assert main(argv + extra) == 0
        out, err = capsys.readouterr()
        assert out == "JULIET:" + g.text + "\n"
        n = len(g.tokens) - g.n_prompt
        rate = re.match(rf"{n} tokens? in ([\d.]+) s, ([\d.]+) tokens/s", err)
        assert rate and float(rate[2]) > 0, err
        assert f"drafts accepted {g.accepted}/{g.drafted} ({g.acceptance_rate:.1%})" in err  # D = 1: no depths
        assert f"draft vocabulary {g.draft_vocab:,} of {m.cfg.vocab_size:,} tokens" in err  # the K generate used
    assert main(argv + ["--draft-vocab", "64"]) == 0
    assert "draft vocabulary 64 of 50,257 tokens" in capsys.readouterr().err
    # token ids: the drafts counted from generate_tokens' own list
    from dsv3.generate import generate_tokens

    drafts = []
    ids = [int(t) for t in generate_tokens(m, torch.tensor([[1, 2, 3]]), 20, temperature=0, speculative=True,
                                           drafts=drafts)]
    pairs = [(int(d[0]), t) for d, t in zip(drafts, ids, strict=True) if d[0] >= 0]
    assert main(["generate", "--checkpoint", str(path), "--prompt-ids", "1 2 3", "--max-new-tokens", "20",
                 "--temperature", "0", "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in ids]
    assert f"drafts accepted {sum(d == t for d, t in pairs)}/{len(pairs)}" in err


def test_report_gives_the_acceptance_of_each_draft_depth(mtp2_run, capsys):
    """Two drafts per round: the report adds each depth's acceptance, the rates acceptance_by_depth() gives for the
    same seeded run, here counted from the raw drafts and depths (text and token ids alike). The draft scores the
    whole vocabulary, so that the random model keeps its depth-1 drafts often enough for depth 2 to draft."""
    from dsv3.generate import generate_tokens

    path, m = mtp2_run
    g = dsv3.generate(m, "JULIET:", 30, temperature=0.9, seed=5, speculative=True, draft_vocab=0, return_trace=True)
    rates = depth_rates(g.drafts, g.draft_depths, g.tokens[g.n_prompt:])
    assert len(rates) == 2 and g.acceptance_by_depth() == rates
    argv = ["generate", "--checkpoint", str(path), "--max-new-tokens", "30", "--seed", "5", "--temperature", "0.9",
            "--speculative", "--draft-vocab", "0"]
    assert main(argv + ["--prompt", "JULIET:"]) == 0
    err = capsys.readouterr().err
    assert (f"; drafts accepted {g.accepted}/{g.drafted} ({g.acceptance_rate:.1%}; by depth {rates[0]:.1%} / "
            f"{rates[1]:.1%}), draft vocabulary ") in err
    drafts, depths = [], []
    ids = [int(t) for t in generate_tokens(m, torch.tensor([[1, 2, 3]]), 30, temperature=0.9, seed=5,
                                           speculative=True, draft_vocab=0, drafts=drafts, draft_depths=depths)]
    drafts = [int(d[0]) for d in drafts]
    rates = depth_rates(drafts, depths, ids)
    kept = sum(d == t for d, k, t in zip(drafts, depths, ids, strict=True) if k)
    assert len(rates) == 2
    assert main(argv + ["--prompt-ids", "1 2 3"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in ids]
    assert (f"; drafts accepted {kept}/{sum(map(bool, depths))} ({kept / sum(map(bool, depths)):.1%}; by depth "
            f"{rates[0]:.1%} / {rates[1]:.1%}), draft vocabulary ") in err


def test_plain_generate_reports_without_drafts(run, capsys):
    assert main(["generate", "--checkpoint", str(run[0]), "--prompt", "x", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("3 tokens in ") and "tokens/s" in err and "drafts" not in err


# --- info ---

def test_info_reads_a_checkpoints_config_and_defaults_to_trains_preset(mtp_run, capsys):
    from dsv3.train import TrainConfig

    path, m = mtp_run
    assert main(["info", "--checkpoint", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["config"] == m.cfg.to_dict() and got["checkpoint"] == str(path / "step_000000")
    assert got["params"]["total"] == sum(p.numel() for p in m.parameters())
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == TrainConfig.preset == "tiny"
