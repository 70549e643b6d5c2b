"""Data-parallel training (torchrun, gloo on CPU): 2 ranks reproduce 1 process step for step, checkpoints
cross world sizes in both directions, the router bias follows the global expert load, and a run without
torchrun never touches torch.distributed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not os.environ.get("DSV3_CORPUS"), reason="needs DSV3_CORPUS (Tiny Shakespeare)")
# the tiny preset (GPT-2 vocabulary, MLA + MoE, aux_loss_coef 1e-2) with a narrow trunk; a router bias
# speed large enough that the aux-loss-free update changes which experts later tokens pick
FAST = dict(dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_inter_dim=32, bias_update_speed=1e-2)
# global batch 8: 1 process x grad_accum 4 == 2 ranks x grad_accum 2 (micro-batches of 2 rows either way)
RUN = dict(batch_size=8, seq_len=32, lr=3e-3, warmup=2, eval_interval=1000, eval_batches=1, threads=1)
ARGS = ["--batch-size=8", "--seq-len=32", "--eval-batches=1", "--threads=1", "--no-progress", "--grad-accum=2"]


@pytest.fixture(autouse=True)
def env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path_factory.getbasetemp() / "dsv3-cache"))  # one token cache
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def torchrun_cmd(*args, nproc=2):
    """`torchrun --standalone --nproc-per-node=2 -m dsv3 train ...` (a free localhost port via c10d)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "dsv3", "train", *args]


def child_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # (DSV3_DATA_DIR: the fixture's)


def torchrun(*args):
    p = subprocess.run(torchrun_cmd(*args), cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def biases(path):
    return torch.stack([m.gate.bias for m in load_checkpoint(path).moe_layers()])


def test_two_ranks_match_one_process_and_resume_across_world_sizes(tmp_path, monkeypatch):
    # the reference: 12 steps in this process; torch.distributed must stay untouched
    def refuse(*a, **k):
        raise AssertionError("a single-process run called torch.distributed")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    ref = dsv3.train(preset="tiny", model_overrides=FAST, steps=12, decay_steps=6, grad_accum=4, save_interval=3,
                     keep=4, progress=False, out=str(tmp_path / "ref"), **RUN)
    assert not torch.distributed.is_initialized()
    monkeypatch.undo()

    run = tmp_path / "run"
    # steps 1-6 on 2 ranks, 7-9 resumed by 1 process, 10-12 resumed by 2 ranks again
    out = torchrun("--preset=tiny", "--steps=6", f"--out={run}", "--lr=3e-3", "--warmup=2", "--eval-interval=1000",
                   "--save-interval=3", "--keep=4", *ARGS, *[f"--set={k}={v}" for k, v in FAST.items()])
    assert out.count("done: step 6,") == 1  # rank 0 alone reports
    dsv3.train(resume=run, steps=3, grad_accum=4, threads=1, progress=False)
    out = torchrun(f"--resume={run}", "--steps=3", *ARGS)
    assert out.count("done: step 12,") == 1

    got = dsv3.History.from_jsonl(run / "metrics.jsonl")  # written by rank 0 alone: each step once
    assert got.column("step") == list(range(1, 13)) == ref.column("step")
    diff = max(abs(a - b) for a, b in zip(got.column("loss"), ref.column("loss"), strict=True))
    assert diff < 1e-5, diff  # (measured: at most 9.5e-7, one fp32 ulp at a loss of 10.8)
    assert got.column("grad_norm") == pytest.approx(ref.column("grad_norm"), rel=1e-5)
    assert got.column("expert_load") == ref.column("expert_load")  # the global load, not one rank's half
    for step in (3, 6, 9, 12):  # written by 2 ranks (3, 6, 12) and by 1 process (9)
        name = f"step_{step:06d}"
        b = biases(run / name)
        assert b.abs().sum() > 0 and torch.equal(b, biases(tmp_path / "ref" / name)), step
    a, b = load_checkpoint(run).state_dict(), ref.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_global_batch_must_split_over_ranks_and_micro_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be a multiple of world_size x grad_accum \(2 x 2\)"):
        dsv3.train(preset="tiny", batch_size=6, grad_accum=2, out=str(tmp_path))
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_after_the_same_step_and_rank_0_saves(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(torchrun_cmd("--preset=tiny", "--steps=100000", "--save-interval=2", "--batch-size=2",
                                      "--seq-len=16", "--eval-batches=1", "--threads=1", "--no-progress",
                                      f"--out={out}", "--set=dim=32", "--set=n_layers=2"),
                         cwd=ROOT, env=child_env(), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list_checkpoints(out):
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 120, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: torchrun and both workers (which torchrun signals again)
    stdout, stderr = p.communicate(timeout=120)
    assert stdout.count("interrupted: step ") == 1, stderr[-3000:]  # torchrun itself exits 1 on SIGINT
    step = int(stdout.split("interrupted: step ")[1].split(",")[0])
    assert list_checkpoints(out)[-1].name == f"step_{step:06d}"
    assert dsv3.History.from_jsonl(out / "metrics.jsonl").column("step") == list(range(1, step + 1))
