"""Fewer CPU threads while another job shares the cores, all of them again once it has gone.

torch runs CPU operators on an OpenMP pool, one thread per core, whose waiting threads spin a few ms before
they sleep. Alone, a process keeps its cores busy: CPU time ~ wall time x threads. Beside another busy job on
the same cores each process gets only its share, and threads spinning at a barrier for a partner that is not
running waste most of it: two trainings on 2 cores kept ~27% of their speed each. Sleeping at once
(OMP_WAIT_POLICY=PASSIVE) cured that but cost a third of the speed alone, so the spinning stays and
`ThreadGovernor` watches efficiency = CPU time / (wall time x threads) over windows of >= 1 s instead: ~1 alone,
~1/2 beside another busy job on 2 cores. Below `LOW` it halves the threads (on 2 cores: a core per job). While
reduced it tries more threads again once cores sit idle (Linux /proc/stat; elsewhere after `wait` windows) and
keeps them if efficiency stays high; a try that finds the cores still shared doubles `wait` before the next.
It never goes above the thread count it started from, and it is off when the user chose the threads
(OMP_NUM_THREADS in the environment, TrainConfig.threads / --threads) or set DSV3_ADAPTIVE_THREADS=0.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch

LOW = 0.75  # efficiency below this: the cores are shared (alone ~0.9-1.0; 2 of 3 threads on 2 cores ~0.67)
WINDOW = 1.0  # seconds of governed work per decision
IDLE = 0.5  # idle CPUs (on average over a window) that make trying more threads worthwhile
MAX_WAIT = 32  # windows between tries at most


def enabled() -> bool:
    """Off with DSV3_ADAPTIVE_THREADS=0 or when OMP_NUM_THREADS fixes the thread count."""
    return os.environ.get("DSV3_ADAPTIVE_THREADS", "1") != "0" and "OMP_NUM_THREADS" not in os.environ


def idle_seconds() -> float | None:
    """CPU seconds the machine's CPUs have spent idle since boot (Linux), or None where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait ...
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Call `begin()` before a run of steps, `tick()` after each step, `end()` after the run."""

    def __init__(self, *, low: float = LOW, window: float = WINDOW, clock: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.process_time, idle: Callable[[], float | None] = idle_seconds,
                 get_threads: Callable[[], int] = torch.get_num_threads,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.low, self.window, self.clock, self.cpu, self.idle = low, window, clock, cpu, idle
        self.get_threads, self.set_threads = get_threads, set_threads
        self.threads: int | None = None  # the count in use (None: not yet governed)
        self.wait, self.since, self.probing = 1, 0, False
        self.caller = self.max = 1
        self.last_efficiency: float | None = None

    def begin(self) -> None:
        """Start governing from the caller's thread count (the ceiling), at the count learnt so far."""
        self.caller = self.get_threads()
        self.max = self.caller
        self.threads = min(self.threads or self.max, self.max)
        if self.threads != self.caller:
            self.set_threads(self.threads)
        self._mark()

    def end(self) -> None:
        """Give the caller back its thread count."""
        if self.get_threads() != self.caller:
            self.set_threads(self.caller)

    def _mark(self) -> None:
        self.t0, self.c0, self.i0 = self.clock(), self.cpu(), self.idle()

    def tick(self) -> None:
        """One step done: once a window has passed, judge it."""
        if self.threads is None:  # begin() not called yet
            return
        wall = self.clock() - self.t0
        if wall < self.window:
            return
        cpu, idle = self.cpu() - self.c0, self.idle()
        idle_cpus = None if idle is None or self.i0 is None else (idle - self.i0) / wall
        self.last_efficiency = cpu / (wall * self.threads)
        self.decide(self.last_efficiency, idle_cpus)
        self._mark()

    def decide(self, efficiency: float, idle_cpus: float | None) -> None:
        """One window's verdict: efficiency = CPU s / (wall s x threads); idle_cpus: the machine's idle CPUs."""
        probed, self.probing = self.probing, False
        if efficiency < self.low and self.threads > 1:  # sharing the cores: fewer threads spin less
            if probed:
                self.wait = min(2 * self.wait, MAX_WAIT)  # still shared: wait longer before the next try
            self._set(self.threads // 2)
            return
        if probed:
            self.wait = 1  # the try held: the other job has gone
        if self.threads < self.max:
            self.since += 1
            if self.since >= self.wait and (idle_cpus is None or idle_cpus >= IDLE):  # cores free: try more
                self.probing = True
                self._set(min(2 * self.threads, self.max))

    def _set(self, n: int) -> None:
        self.threads, self.since = n, 0
        self.set_threads(n)


_shared: ThreadGovernor | None = None
_fixed = False


def fix(n: int) -> None:
    """Use `n` threads from now on, ungoverned (the user's explicit choice, e.g. `--threads`)."""
    global _fixed
    _fixed = True
    torch.set_num_threads(n)


def governor(explicit: bool = False, device: torch.device | str = "cpu",
             compiled: bool = False) -> ThreadGovernor | None:
    """The process's governor (what it learnt carries over between runs), or None when it is off: threads chosen
    by the user, not on the CPU, or under torch.compile (compiled graphs are guarded on the thread count: a change
    recompiles them)."""
    global _shared
    if explicit or _fixed or not enabled() or torch.device(device).type != "cpu" or compiled:
        return None
    if _shared is None:
        _shared = ThreadGovernor()
    return _shared


@contextlib.contextmanager
def governed(device: torch.device | str = "cpu", compiled: bool = False):
    """Govern the steps run inside: yields `tick`, to call after each step (a no-op where the governor is off);
    the caller's thread count comes back at the end."""
    gov = governor(device=device, compiled=compiled)
    if gov is None:
        yield lambda: None
        return
    gov.begin()
    try:
        yield gov.tick
    finally:
        gov.end()
