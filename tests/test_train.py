"""Training: schedule, learning, exact resume, non-finite loss, Ctrl-C, a SIGKILL mid-run, the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.checkpoint import list_checkpoints
from dsv3.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
train_module = sys.modules["dsv3.train"]  # (dsv3.train is the function)
pytestmark = pytest.mark.skipif(not os.environ.get("DSV3_CORPUS"), reason="needs DSV3_CORPUS (Tiny Shakespeare)")
# the tiny preset (GPT-2 vocabulary, MLA + MoE) with a narrow trunk so a step takes milliseconds
FAST = dict(dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_inter_dim=32, bias_update_speed=1e-3)
FAST_ARGS = [f"--set={k}={v}" for k, v in FAST.items()]


@pytest.fixture(autouse=True)
def data_dir(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "dsv3-cache"  # one token cache for the session
    monkeypatch.setenv("DSV3_DATA_DIR", str(d))
    return d


def run(out, **kw):
    base = dict(preset="tiny", model_overrides=FAST, batch_size=4, seq_len=32, lr=3e-3, warmup=2, threads=1,
                eval_interval=1000, eval_batches=2, progress=False, out=str(out))
    return dsv3.train(**{**base, **kw})


def test_config_defaults_and_errors():
    c = TrainConfig(preset="174m")
    assert (c.steps, c.batch_size, c.seq_len, c.lr, c.warmup) == (5000, 16, 1024, 1e-3, 100)
    for bad, words in [(dict(steps=0), "^steps must be an int >= 1, got 0$"), (dict(lr=-1.0), "^lr must be > 0"),
                       (dict(dtype="fp8"), "^dtype must be"), (dict(early_stop=-1), "^early_stop must be an int >= 0"),
                       (dict(batch_size=6, grad_accum=4), r"^batch_size \(6\) must be a multiple of grad_accum"),
                       (dict(preset="huge"), "^unknown preset 'huge'")]:
        with pytest.raises(ValueError, match=words):  # names the field, not the class
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="seq_len 512 exceeds the model's max_seq_len 256"):
        TrainConfig(preset="tiny", seq_len=512).model_config()


def test_lr_schedule_warms_up_decays_and_never_jumps():
    c = TrainConfig(preset="tiny", lr=1e-3, warmup=10, steps=100, min_lr_ratio=0.1)
    lrs = [c.lr_at(s) for s in range(150)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[100] == lrs[149] == pytest.approx(1e-4)  # phase 2 continues at min_lr
    assert all(b <= a for a, b in pairwise(lrs[9:]))
    assert max(abs(b - a) for a, b in pairwise(lrs)) <= 1e-4 + 1e-12  # no jump larger than a warmup step


def test_loss_decreases_on_tiny_shakespeare(tmp_path):
    h = run(tmp_path, steps=30, batch_size=8, lr=1e-2, eval_interval=30, eval_batches=4)
    first = sum(h.column("loss")[:5]) / 5
    last = sum(h.column("loss")[-5:]) / 5
    assert first > 10.0 and last < first - 1.5, (first, last)  # from ~ln(50257) = 10.8
    assert h.val[-1]["step"] == 30 and h.val[-1]["val_loss"] < 9.3
    rec = h.train[-1]
    assert set(rec) >= {"step", "loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "expert_load"}
    assert rec["loss"] == pytest.approx(rec["ce"] + rec["aux"] + rec["z"], rel=1e-5)
    assert len(rec["expert_load"]) == 2 and sum(rec["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 31))
    assert dsv3.train.__module__ == "dsv3.train" and h.model is not None and not h.model.training


def test_figures_are_named_for_what_they_are(tmp_path):
    """train CE, val CE and the MTP cross-entropy each under its own name; the total only as `loss`."""
    h = run(tmp_path, steps=2, eval_interval=2, model_overrides={**FAST, "n_mtp_layers": 1})
    first, val = h.train[0], h.val[-1]
    assert first["ce"] == pytest.approx(math.log(50257), rel=0.02)  # at init every head is near-uniform
    assert first["mtp_ce"] == pytest.approx(math.log(50257), rel=0.02)  # the MTP CE, not 0.3 x it
    assert first["loss"] == pytest.approx(first["ce"] + first["aux"] + first["z"] + 0.3 * first["mtp_ce"], rel=1e-5)
    assert val["val_ce"] == val["val_loss"] and h.best_val_loss == val["val_ce"]
    text = train_module.summary(h)
    assert f"train CE {h.train[-1]['ce']:.4f}, val CE {val['val_ce']:.4f}, MTP CE {h.train[-1]['mtp_ce']:.4f}, " \
           f"total loss {h.train[-1]['loss']:.4f} (CE + aux + z + weighted MTP CE)" in text
    # a metrics.jsonl written before val_ce existed still reads (plots and the notebooks take val_loss)
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"step": 1, "loss": 9.0, "ce": 8.9, "kind": "train"}) + "\n" +
                   json.dumps({"step": 1, "val_loss": 8.5, "kind": "val"}) + "\n")
    assert dsv3.History.from_jsonl(old).best == {"step": 1, "val_loss": 8.5}


def test_resume_is_bitwise_exact(tmp_path):
    kw = dict(grad_accum=2, decay_steps=10)  # accumulation, router bias and optimizer all in play
    full = run(tmp_path / "full", steps=10, **kw)
    part = run(tmp_path / "part", steps=6, **kw)
    assert part.train[-1]["lr"] != part.train[-2]["lr"]
    rest = dsv3.train(resume=tmp_path / "part", steps=4, progress=False)
    assert rest.column("step") == list(range(1, 11))
    for key in ("loss", "ce", "aux", "z", "lr", "grad_norm", "expert_load"):
        assert rest.column(key) == full.column(key), key  # exactly equal, not approximately
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(m.gate.bias.abs().sum() > 0 for m in rest.model.moe_layers())
    with pytest.raises(ValueError, match="lr cannot change on resume"):
        dsv3.train(resume=tmp_path / "part", lr=1.0)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = dsv3.DeepSeekV3.forward

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third training step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(dsv3.DeepSeekV3, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3.*step_000002"):
        run(tmp_path, steps=6, save_interval=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    _, state = dsv3.load_checkpoint(tmp_path, with_state=True)
    assert state["step"] == 2


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # 1 thread: far faster on a busy CPU
    return subprocess.Popen([sys.executable, "-m", "dsv3", "train", *args], cwd=kw.pop("cwd", ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_checkpoint(proc, run_dir, timeout=120):
    t0 = time.time()
    while not list_checkpoints(run_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.05)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    common = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]
    p = _cli("--preset", "tiny", "--steps", "4", "--out", str(out), *common, *FAST_ARGS)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    h = dsv3.History.from_jsonl(out / "metrics.jsonl")
    assert stdout.startswith(f"done: step 4, train CE {h.train[-1]['ce']:.4f}, val CE {h.val[-1]['val_ce']:.4f}, "
                             f"total loss {h.train[-1]['loss']:.4f} (CE + aux + z), ") and "tokens/s" in stdout
    assert f"best: step 4, val CE {h.best_val_loss:.4f}" in stdout
    assert "training on cpu, fp32" not in stderr  # (--no-progress: nothing on stderr)
    p = _cli("--resume", str(out), "--steps", "2", *common)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "done: step 6," in stdout and (out / "step_000006").is_dir()
    assert dsv3.load_checkpoint(out).cfg.dim == 32



def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from dsv3.__main__ import main

    assert main(["train", "--preset", "tiny", "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == "error: --steps must be an int >= 1, got 0\n"
    assert main(["train", "--batch-size", "6", "--grad-accum", "4", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == "error: --batch-size (6) must be a multiple of --grad-accum (4)\n"
    assert main(["train", "--set", "dim=0", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == "error: --set: dim must be >= 1, got 0\n"
    assert main(["train", "--seq-len", "512", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == "error: --seq-len 512 exceeds the model's max_seq_len 256\n"
    run(tmp_path / "run", steps=1)
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "run"), *FAST_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder") and "already holds checkpoints" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_second_training_on_a_run_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    from dsv3.__main__ import main
    from dsv3.checkpoint import RunInUse

    out = tmp_path / "run"
    common = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]
    first = _cli("--preset", "tiny", "--steps", "100000", "--save-interval", "2", "--out", str(out), *common,
                 *FAST_ARGS)
    _wait_for_checkpoint(first, out)
    try:  # a CLI run and a notebook beside it, each told in one line
        second = _cli("--resume", str(out), "--steps", "1", *common)
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2 and stderr == (f"error: run folder {out} is in use by another training (pid "
                                                     f"{first.pid}); wait for it to end, or train into another "
                                                     "folder (out=..., --out)\n")
        assert main(["train", "--preset", "tiny", "--overwrite", "--out", str(out), *common, *FAST_ARGS]) == 2
        assert "is in use by another training" in capsys.readouterr().err  # (--overwrite deletes nothing)
        with pytest.raises(RunInUse):
            dsv3.train(resume=out, steps=1, progress=False)
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the lock goes with the process
        first.wait()
    step = dsv3.load_checkpoint(out, with_state=True)[1]["step"]
    assert dsv3.train(resume=out, steps=1, progress=False).column("step")[-1] == step + 1


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import errno

    from dsv3.__main__ import main

    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # the step-4 checkpoint's state.pt: half written, then the disk is full
        if "step_000004" in str(f):
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    out, kw = tmp_path / "run", dict(steps=6, eval_interval=2, save_interval=2, keep=5)
    full = run(tmp_path / "full", **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    args = ["--preset", "tiny", "--out", str(out), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
            "--warmup", "2", "--threads", "1", "--eval-batches", "2", "--no-progress", *FAST_ARGS]
    assert main(["train", *args, *(f"--{k.replace('_', '-')}={v}" for k, v in kw.items())]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write step_000004 in {out} at step 4: No space left on device. The "
                          "checkpoints saved before are intact (step_000002, best/); free some space, then resume "
                          f"from {out}") and err.count("\n") == 1
    assert [p.name for p in list_checkpoints(out)] == ["step_000002"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the half-written folder is gone
    dsv3.load_checkpoint(out, best=True, with_state=True)  # best/ loads
    monkeypatch.setattr(torch, "save", real_save)  # space is back
    resumed = dsv3.train(resume=out, steps=4, progress=False)
    for key in ("step", "loss", "grad_norm"):
        assert resumed.column(key) == full.column(key), key  # as if the disk had never filled
    assert resumed.column("val_loss", "val") == full.column("val_loss", "val")


@pytest.mark.slow
def test_atomic_save_survives_a_kill(tmp_path):
    """SIGKILL mid-run (saving every step), resume from the disk, and match an uninterrupted run."""
    out = tmp_path / "killed"
    args = ["--batch-size", "2", "--seq-len", "16", "--eval-interval", "100", "--eval-batches", "1", "--no-progress",
            "--warmup", "2", "--seed", "5", *FAST_ARGS]
    # the uninterrupted reference runs alongside, in a process set up the same way
    ref = _cli("--preset", "tiny", "--steps", "12", "--out", str(tmp_path / "full"), *args)
    p = _cli("--preset", "tiny", "--steps", "12", "--save-interval", "2", "--keep", "2", "--out", str(out), *args)
    _wait_for_checkpoint(p, out)
    p.send_signal(signal.SIGKILL)  # while it trains (and, likely, writes) the next steps
    p.wait()
    saved = dsv3.load_checkpoint(out, with_state=True)[1]["step"]
    assert 2 <= saved < 12
    p = _cli("--resume", str(out), "--steps", str(12 - saved), *args[:-len(FAST_ARGS)])
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert ref.communicate(timeout=300) and ref.returncode == 0
    resumed = dsv3.History.from_jsonl(out / "metrics.jsonl")
    full = dsv3.History.from_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert resumed.column("step") == list(range(1, 13))
    assert resumed.column("loss") == full.column("loss")


def test_ctrl_c_saves_then_exits(tmp_path):
    out = tmp_path / "run"
    p = _cli("--preset", "tiny", "--steps", "100000", "--save-interval", "2", "--batch-size", "2", "--seq-len", "16",
             "--eval-batches", "1", "--no-progress", "--out", str(out), *FAST_ARGS)
    _wait_for_checkpoint(p, out)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert stdout.startswith("interrupted: step ")
    step = int(stdout.split()[2].rstrip(","))
    assert dsv3.load_checkpoint(out, with_state=True)[1]["step"] == step >= 2
    assert not math.isnan(dsv3.History.from_jsonl(out / "metrics.jsonl").val[-1]["val_loss"])


@pytest.fixture
def scripted_val(monkeypatch):
    """evaluate() returns the next of the given losses (the real one runs for the expert loads)."""
    losses, calls = [], []
    real = train_module.evaluate

    def fake(*a, **k):
        calls.append(len(calls))
        return losses.pop(0), real(*a, **k)[1]

    monkeypatch.setattr(train_module, "evaluate", fake)
    return losses


def same_weights(a, b) -> bool:
    sa, sb = dsv3.load_checkpoint(a).state_dict(), dsv3.load_checkpoint(b).state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_best_checkpoint_is_kept_and_tracked_across_resumes(tmp_path, scripted_val):
    run_dir = tmp_path / "run"
    scripted_val[:] = [5.0, 4.0, 4.5, 4.6]
    h = run(run_dir, steps=4, eval_interval=1, save_interval=1, keep=10)
    assert (h.best_step, h.best_val_loss) == (2, 4.0) and h.column("step", "val") == [1, 2, 3, 4]
    assert dsv3.load_checkpoint(run_dir, best=True, with_state=True)[1]["step"] == 2
    assert same_weights(run_dir / "best", run_dir / "step_000002")
    assert dsv3.History.from_jsonl(run_dir / "metrics.jsonl").best == h.best
    # a resumed run counts validations without improvement from phase 1 on: 2 there + 1 here = early_stop 3
    scripted_val[:] = [4.2]
    h = dsv3.train(resume=run_dir, steps=10, early_stop=3, progress=False)
    assert h.stopped_early and h.column("step")[-1] == 5 and h.best_step == 2
    assert dsv3.load_checkpoint(run_dir, with_state=True)[1]["step"] == 5  # saved where it stopped
    scripted_val[:] = [3.8, 3.9]
    h = dsv3.train(resume=run_dir, steps=2, progress=False)
    assert (h.best_step, h.best_val_loss) == (6, 3.8) and not h.stopped_early
    assert same_weights(run_dir / "best", run_dir / "step_000006")
    # continuing from best/ goes to another folder (the run's later checkpoints stay), and brings best/ along
    with pytest.raises(ValueError, match="newer than step 6 .*step_000007.*out="):
        dsv3.train(resume=run_dir / "best", steps=1, progress=False)
    scripted_val[:] = [3.9]
    h = dsv3.train(resume=run_dir / "best", steps=1, out=str(tmp_path / "branch"), progress=False)
    assert h.column("step")[-1] == 7 and h.best_step == 6
    assert same_weights(tmp_path / "branch" / "best", run_dir / "step_000006")


def test_early_stop_and_the_bar_says_validating(tmp_path, scripted_val, monkeypatch):
    import tqdm.auto

    events = []

    class Bar(tqdm.auto.tqdm):
        def set_description(self, desc=None, refresh=True):
            events.append(desc)
            super().set_description(desc, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: (events.append("evaluate"), real(*a, **k))[1])
    scripted_val[:] = [5.0, 4.0, 4.1, 4.2, 4.0, 3.0]
    h = run(tmp_path, steps=20, eval_interval=2, early_stop=3)
    assert h.stopped_early and h.column("step", "val") == [2, 4, 6, 8, 10] and h.column("step")[-1] == 10
    assert h.best_step == 4 and dsv3.load_checkpoint(tmp_path, with_state=True)[1]["step"] == 10
    assert events.count("evaluate") == 5
    assert all(events[i - 1] == "train tiny (validating)" for i, e in enumerate(events) if e == "evaluate")
    assert "train tiny (saving)" in events and events[-1] == "train tiny"
    scripted_val[:] = [4.5]  # the final validation after the last step says so too
    events.clear()
    run(tmp_path / "b", steps=3, eval_interval=100)
    assert events[events.index("evaluate") - 1] == "train tiny (validating)"


@pytest.mark.slow
def test_kill_sweep_never_leaves_a_partial_checkpoint(tmp_path):
    """SIGKILL at random moments (saving, validating and pruning every step), check the disk, resume; repeat."""
    import random

    rng = random.Random(31)
    out, total = tmp_path / "run", 40
    args = ["--batch-size", "2", "--seq-len", "16", "--eval-interval", "1", "--eval-batches", "1", "--save-interval",
            "1", "--keep", "2", "--no-progress", "--warmup", "2"]
    kills, step = 0, 0
    while step < total:
        first = ["--preset", "tiny", "--steps", str(total), "--out", str(out), *FAST_ARGS]
        p = _cli(*(first if step == 0 else ["--resume", str(out), "--steps", str(total - step)]), *args)
        if kills < 5:
            t0 = time.time()
            while not any(int(c.name[5:]) > step for c in list_checkpoints(out)) and p.poll() is None:
                assert time.time() - t0 < 120, "no new checkpoint appeared"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            p.send_signal(signal.SIGKILL)
            kills += p.wait() == -signal.SIGKILL
        else:
            _, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr
        # every checkpoint folder under a real name is complete and loads; list_checkpoints lists exactly them
        named = sorted(c for c in out.iterdir() if c.name.startswith("step_") or c.name == "best")
        for c in named:
            assert sorted(f.name for f in c.iterdir()) == ["meta.json", "model.safetensors", "state.pt"], c
            dsv3.load_checkpoint(c, with_state=True)
        assert list_checkpoints(out) == [c for c in named if c.name != "best"]
        step = dsv3.load_checkpoint(out, with_state=True)[1]["step"]
    assert kills == 5 and step == total
    assert not [c.name for c in out.iterdir() if c.name.startswith(".")]  # the last saves cleaned every leftover
    h = dsv3.History.from_jsonl(out / "metrics.jsonl")
    assert h.column("step") == list(range(1, total + 1)) and h.column("step", "val") == list(range(1, total + 1))
    assert dsv3.load_checkpoint(out, best=True, with_state=True)[1]["step"] == h.best_step
