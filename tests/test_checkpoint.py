"""Checkpoints: exact round trip (tied weights, router biases, optimizer, RNG), keep-K, and clear errors."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import small_cfg

import dsv3
from dsv3.checkpoint import (
    FILES,
    best_checkpoint,
    is_complete,
    list_checkpoints,
    load_state,
    load_weights,
    save_checkpoint,
)


def trained_model(seed=0, **over):
    torch.manual_seed(seed)
    model = dsv3.DeepSeekV3(small_cfg(bias_update_speed=0.01, **over))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        x = torch.randint(0, 512, (2, 16))
        model(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_bias()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = trained_model()
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())  # the biases moved
    random.seed(7)
    ckpt = save_checkpoint(tmp_path, model, step=2, optimizer=opt, meta={"note": "hi"})
    py_next = random.random()
    loaded, state = dsv3.load_checkpoint(tmp_path, with_state=True)
    assert not loaded.training and loaded.cfg == model.cfg
    assert loaded.head.weight is loaded.embed.weight  # still tied
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # includes layers.*.ffn.gate.bias
    assert state["step"] == 2 and state["note"] == "hi" and state["path"] == str(ckpt)
    random.setstate(state["python_rng"])
    assert random.random() == py_next
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    x = torch.randint(0, 512, (1, 8))
    assert torch.equal(model.eval()(x).logits, loaded(x).logits)


def test_a_checkpoint_from_before_newer_config_fields_loads(tmp_path):
    model, _ = trained_model()
    ckpt = save_checkpoint(tmp_path, model, step=1)
    meta = json.loads((ckpt / "meta.json").read_text())
    for k in ("yarn_factor", "yarn_mscale_all_dim", "latent_norm_eps", "group_score"):  # added with dsv3.from_hf
        del meta["config"][k]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    loaded = dsv3.load_checkpoint(ckpt)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_run_folder_keeps_the_newest_k(tmp_path):
    model, _ = trained_model()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, model, step=step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    (tmp_path / ".tmp-step_000005-abc").mkdir()  # what a kill mid-save leaves behind: ignored
    assert load_state(tmp_path / "step_000004")["step"] == 4
    assert dsv3.load_checkpoint(tmp_path, with_state=True)[1]["step"] == 4
    save_checkpoint(tmp_path, model, step=4, keep=2)  # re-saving a step replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_errors_name_the_file_and_the_problem(tmp_path):
    model, opt = trained_model()
    ckpt = save_checkpoint(tmp_path / "run", model, step=1, optimizer=opt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dsv3.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        dsv3.load_checkpoint(tmp_path / "empty")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ValueError, match="not a dsv3 checkpoint"):
        dsv3.load_checkpoint(notes)
    # another model config: the differing field is named
    other = dsv3.DeepSeekV3(small_cfg(n_layers=3))
    with pytest.raises(ValueError, match="n_layers: checkpoint 2 vs model 3"):
        load_weights(other, ckpt)
    # truncated weights
    w = ckpt / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        dsv3.load_checkpoint(ckpt)
    w.write_bytes(good)
    # truncated training state
    s = ckpt / "state.pt"
    s.write_bytes(s.read_bytes()[:1000])
    with pytest.raises(ValueError, match="state.pt is corrupt"):
        dsv3.load_checkpoint(ckpt, with_state=True)
    # a foreign or broken meta.json
    meta = ckpt / "meta.json"
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="meta.json is not a dsv3 checkpoint"):
        dsv3.load_checkpoint(ckpt)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        dsv3.load_checkpoint(ckpt)


class Payload:  # a pickled object would need this code to load: weights_only refuses it
    def __reduce__(self):
        return (print, ("executed!",))


def test_loading_never_runs_pickled_code(tmp_path, capsys):
    model, _ = trained_model()
    ckpt = save_checkpoint(tmp_path, model, step=1)
    torch.save({"rng_torch": torch.get_rng_state(), "optimizer": Payload()}, ckpt / "state.pt")
    with pytest.raises(ValueError, match="state.pt is corrupt or not a dsv3 training state"):
        dsv3.load_checkpoint(ckpt, with_state=True)
    assert "executed!" not in capsys.readouterr().out


def test_best_is_a_complete_checkpoint_beside_the_steps(tmp_path):
    model, opt = trained_model()
    save_checkpoint(tmp_path, model, step=1, optimizer=opt, keep=1)
    best = save_checkpoint(tmp_path, model, step=1, optimizer=opt, best=True)
    assert best == tmp_path / "best" and sorted(p.name for p in best.iterdir()) == sorted(FILES)
    model2, _ = trained_model(seed=1)
    save_checkpoint(tmp_path, model2, step=2, optimizer=opt, keep=1)  # pruning never touches best/
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"] and best_checkpoint(tmp_path) == best
    loaded = dsv3.load_checkpoint(tmp_path, best=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                  strict=True))
    assert dsv3.load_checkpoint(tmp_path / "step_000002", best=True, with_state=True)[1]["step"] == 1
    assert dsv3.load_checkpoint(tmp_path, with_state=True)[1]["step"] == 2  # the newest, as before
    save_checkpoint(tmp_path, model2, step=2, optimizer=opt, best=True)  # a new best replaces it
    assert load_state(best)["step"] == 2
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="no best checkpoint in"):
        dsv3.load_checkpoint(tmp_path / "other", best=True)


class Killed(BaseException):  # what SIGKILL would do: nothing after it runs
    pass


def test_a_kill_mid_delete_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_model()
    for step in (1, 2):
        save_checkpoint(tmp_path, model, step=step, optimizer=opt, keep=2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # deletes one file of the folder, then the process dies
        next(Path(path).iterdir()).unlink()
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, model, step=3, optimizer=opt, keep=2)  # prunes step 1: killed mid-delete
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.startswith("step_")] == ["step_000002", "step_000003"]
    assert [n[:len(".trash-step_000001")] for n in names if n.startswith(".")] == [".trash-step_000001"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert all(is_complete(p) for p in tmp_path.glob("step_*"))
    # what older versions left (a partial folder under a real name) and a killed save's temp folder
    (tmp_path / "step_000004").mkdir()
    (tmp_path / "step_000004" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-step_000005-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert dsv3.load_checkpoint(tmp_path, with_state=True)[1]["step"] == 3
    save_checkpoint(tmp_path, model, step=6, optimizer=opt, keep=2)  # the next save cleans every leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000006"]


def test_a_kill_between_the_two_renames_of_a_resave_is_undone(tmp_path):
    model, opt = trained_model()
    save_checkpoint(tmp_path, model, step=1, optimizer=opt, best=True)
    (tmp_path / "best").rename(tmp_path / ".old-best")  # killed after moving the old best aside
    (tmp_path / ".tmp-best-abc").mkdir()  # ... with the new one not yet in place
    save_checkpoint(tmp_path, model, step=2, optimizer=opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_000002"]
    assert load_state(tmp_path / "best")["step"] == 1


def test_run_lock_refuses_a_second_holder_and_a_crash_does_not_leave_it_stuck(tmp_path):
    import os
    import subprocess
    import sys

    from dsv3.checkpoint import RunInUse, run_lock

    with run_lock(tmp_path):
        with pytest.raises(RunInUse, match=rf"^run folder {tmp_path} is in use by another training \(pid "
                                            rf"{os.getpid()}\); wait for it to end, or train into another folder"):
            with run_lock(tmp_path):
                pass  # (a second holder in the same process, as two threads of one notebook kernel)
    with run_lock(tmp_path):  # released at the end of the block
        pass
    code = ("import os, signal, sys; from dsv3.checkpoint import run_lock\n"
            "with run_lock(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # killed while holding the lock ...
    with run_lock(tmp_path):  # ... and the kernel released it
        pass
