"""The thread governor (dsv3/threads.py): its decisions on a fake clock, its switches, and that training and
generation use it by default."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3 import threads
from dsv3.threads import ThreadGovernor

ROOT = Path(__file__).resolve().parents[1]


class Machine:
    """A fake process: each `run(seconds, cpus, idle)` advances wall time, this process's CPU time and idle CPUs."""

    def __init__(self, n: int):
        self.wall = self.cpu = self.idle = 0.0
        self.n, self.calls = n, []
        self.gov = ThreadGovernor(clock=lambda: self.wall, cpu=lambda: self.cpu, idle=lambda: self.idle,
                                  get_threads=lambda: self.n, set_threads=self.set)

    def set(self, n: int) -> None:
        self.n = n
        self.calls.append(n)

    def run(self, seconds: float, efficiency: float, idle_cpus: float = 0.0) -> int:
        """One step of `seconds` in which each thread got `efficiency` of a core; returns the threads after it."""
        self.wall += seconds
        self.cpu += seconds * self.n * efficiency
        self.idle += seconds * idle_cpus
        self.gov.tick()
        return self.n


def test_drops_threads_when_the_cores_are_shared_and_takes_them_back_when_free():
    m = Machine(4)
    m.gov.begin()
    assert m.run(0.5, 0.4) == 4  # under a window: no judgement yet
    assert m.run(0.6, 0.4) == 2  # 1.1 s at 0.4 per thread: the cores are shared -> halve
    assert m.gov.last_efficiency == pytest.approx(0.4)
    assert m.run(1.0, 0.5) == 1  # still shared at 2 -> 1
    assert m.run(1.0, 0.5) == 1  # never below one thread
    for _ in range(3):
        assert m.run(1.0, 1.0, idle_cpus=0.0) == 1  # a core each and none idle: stay
    assert m.run(1.0, 1.0, idle_cpus=2.5) == 2  # idle cores: try twice the threads
    assert m.run(1.0, 0.95, idle_cpus=2.0) == 4  # the try held and cores are idle: up to the count it began with
    assert m.run(1.0, 0.95, idle_cpus=3.0) == 4  # never above it
    assert m.calls == [2, 1, 2, 4]


def test_a_try_that_finds_the_cores_still_shared_backs_off():
    m = Machine(2)
    m.gov.begin()
    assert m.run(1.0, 0.5) == 1
    waits = []
    for _ in range(4):
        n = 0  # windows at one thread before the next try, though idle CPUs show up every time
        while m.run(1.0, 1.0, idle_cpus=1.0) == 1:
            n += 1
        waits.append(n)
        assert m.run(1.0, 0.5) == 1  # the try found the other job still there
    assert waits == [0, 1, 3, 7]  # tries after 1, 2, 4, 8 windows
    assert m.run(1.0, 1.0, idle_cpus=1.0) == 1
    for _ in range(15):  # 16 windows in all: the wait has doubled to 16
        m.run(1.0, 1.0, idle_cpus=1.0)
    assert m.n == 2 and m.run(1.0, 0.9) == 2  # a try that holds resets the back-off
    assert m.gov.wait == 1


def test_without_idle_figures_it_tries_on_the_timer():
    m = Machine(2)
    m.gov.idle = lambda: None  # not Linux: no /proc/stat
    m.gov.begin()
    assert [m.run(1.0, x) for x in (0.5, 1.0, 0.5, 1.0, 1.0, 0.9)] == [1, 2, 1, 1, 2, 2]


def test_begin_and_end_keep_the_callers_thread_count_as_the_ceiling():
    m = Machine(2)
    m.gov.begin()
    m.run(1.0, 0.5)
    m.gov.end()
    assert m.n == 2  # the caller gets its count back between runs
    m.gov.begin()
    assert m.n == 1  # ... and a new run starts from what was learnt
    m.gov.end()
    m.n = 1  # the caller now wants one thread: the governor never raises it
    m.gov.begin()
    assert [m.run(1.0, 1.0, idle_cpus=1.0) for _ in range(3)] == [1, 1, 1]


def test_switches(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DSV3_ADAPTIVE_THREADS", raising=False)
    monkeypatch.setattr(threads, "_shared", None)
    monkeypatch.setattr(threads, "_fixed", False)
    gov = threads.governor()
    assert isinstance(gov, ThreadGovernor) and threads.governor() is gov  # on by default, one per process
    assert threads.governor(explicit=True) is None  # TrainConfig.threads / --threads
    assert threads.governor(device="cuda") is None  # CPU threads only
    assert threads.governor(compiled=True) is None  # compiled graphs are guarded on the thread count
    monkeypatch.setenv("DSV3_ADAPTIVE_THREADS", "0")
    assert threads.governor() is None
    monkeypatch.delenv("DSV3_ADAPTIVE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.governor() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    n = torch.get_num_threads()
    try:
        threads.fix(n)  # generate --threads
        assert threads.governor() is None
    finally:
        torch.set_num_threads(n)


class Recorder(ThreadGovernor):
    def __init__(self):
        super().__init__(set_threads=lambda n: None, get_threads=lambda: 2)
        self.log = []

    def begin(self):
        self.log.append("begin")
        super().begin()

    def tick(self):
        self.log.append("tick")

    def end(self):
        self.log.append("end")


@pytest.fixture
def recorder(monkeypatch):
    """The process's governor, recording what calls it; the default switches (no OMP_NUM_THREADS)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DSV3_ADAPTIVE_THREADS", raising=False)
    monkeypatch.setattr(threads, "_fixed", False)
    rec = Recorder()
    monkeypatch.setattr(threads, "_shared", rec)
    return rec


def test_generation_is_governed_by_default(recorder, model):
    out = list(dsv3.generate_tokens(model, torch.zeros(1, 3, dtype=torch.long), 5, temperature=0))
    assert len(out) == 5
    assert recorder.log == ["begin"] + ["tick"] * 4 + ["end"]  # a tick per decoded token
    recorder.log.clear()  # compiled decoding: its graphs are guarded on the thread count, so it is left alone
    list(dsv3.generate_tokens(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=0, compile=True))
    assert recorder.log == []


@pytest.mark.skipif(not os.environ.get("DSV3_CORPUS"), reason="needs DSV3_CORPUS (Tiny Shakespeare)")
def test_training_is_governed_by_default_and_not_when_threads_are_given(recorder, tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path / "cache"))
    fast = dict(dim=32, n_layers=2, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, moe_inter_dim=32)
    base = dict(preset="tiny", model_overrides=fast, batch_size=4, seq_len=32, steps=3, eval_interval=1000,
                eval_batches=1, progress=False)
    dsv3.train(**base, out=str(tmp_path / "a"))
    assert recorder.log == ["begin"] + ["tick"] * 3
    recorder.log.clear()
    dsv3.train(**base, out=str(tmp_path / "b"), threads=1)
    assert recorder.log == []


def test_import_leaves_openmp_alone():
    """No wait-policy default any more (PASSIVE cost a third of the speed alone): libgomp keeps its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import dsv3, os, torch; torch.ones(4) + 1; assert 'OMP_WAIT_POLICY' not in os.environ"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE"})
    assert p.returncode == 0, p.stderr
    assert "GOMP_SPINCOUNT = '300000'" in p.stderr or sys.platform != "linux"
