"""The playground as a web app for many visitors: Voilà serving a one-cell app notebook, bounded in memory.

    python -m dsv3.playground_server [--checkpoints DIR] [--port 7860] [--max-kernels N] ...   (`make playground`)

Every visitor's page runs in its own kernel (a Python process holding torch and the model), so the number of
kernels is what bounds memory and CPU:
  - at most `max_kernels` live at once (default: what the machine's available memory holds, and at most
    SESSIONS_PER_CORE per core, see `default_max_kernels`); a visitor beyond that gets a short "busy, try again"
    page (HTTP 503) instead of a kernel;
  - a kernel whose page was closed (its websocket gone) is shut down once idle for `cull_idle_timeout` seconds,
    checked every `cull_interval` seconds; a page left open but unused loses its kernel after `cull_open_timeout`.
So the server and its kernels stay under `memory_bound_mb` = SERVER_MB + max_kernels x kernel_mb. The server
process itself imports nothing of dsv3 (`-m` re-executes this file as a script), so it holds no torch.
The page is the widget of `dsv3.playground.show` and nothing else (no notebook prose or code), titled, and it
generates nothing until asked. Kernels get OMP_NUM_THREADS=1 unless it is set: many kernels share few cores.
Deliberately not here: the widget itself (playground.py); authentication (it listens on 127.0.0.1 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Integer
from voila.app import Voila
from voila.tornado.handler import TornadoVoilaHandler

TITLE = "dsv3 playground"  # as dsv3.playground.TITLE (this module imports nothing of dsv3: no torch in the server)

BASE_KERNEL_MB = 450  # one playground kernel without its weights: Python, torch, ipykernel, widgets, tokenizer
SERVER_MB = 250  # the Voilà server process itself (it imports no torch)
RESERVE_MB = 1024  # memory left to everything else on the machine
# A kernel decodes on one thread (OMP_NUM_THREADS=1), and a visitor spends most of a session reading and typing,
# not generating. Two sessions per core keep each one at least half a core's speed even when all generate at
# once, where the memory bound alone admitted 42 sessions on 2 cores (a twentieth of a core each).
SESSIONS_PER_CORE = 2


def _meminfo_mb(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def kernel_mb(root: str | os.PathLike) -> int:
    """Memory one kernel is expected to take at its peak: the base plus twice the largest checkpoint's weights in
    `root` or its run folders (loading holds them twice for a moment: 174m, 658 MB of weights, peaks at
    1,629 MB in a plain process; tiny, 32 MB, at 377 MB)."""
    root = Path(root)
    files = [*root.glob("step_*/model.safetensors"), *root.glob("*/step_*/model.safetensors"),
             *root.glob("*/best/model.safetensors")]
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError:  # pruned meanwhile
            pass
    return BASE_KERNEL_MB + 2 * (max(sizes, default=0) >> 20)


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_max_kernels(root: str | os.PathLike) -> int:
    """(MemAvailable - SERVER_MB - RESERVE_MB) // kernel_mb(root), at least 1 (4 when /proc/meminfo is
    unreadable)."""
    avail = _meminfo_mb("MemAvailable")
    if avail is None:
        return 4
    return max(1, (avail - SERVER_MB - RESERVE_MB) // kernel_mb(root))


def default_max_kernels(root: str | os.PathLike) -> int:
    """The default cap: what the memory holds, and at most SESSIONS_PER_CORE sessions per core."""
    return min(memory_max_kernels(root), SESSIONS_PER_CORE * cores())


def memory_bound_mb(max_kernels: int, root: str | os.PathLike) -> int:
    """The resident memory the server and its kernels stay under: SERVER_MB + max_kernels * kernel_mb(root)."""
    return SERVER_MB + max_kernels * kernel_mb(root)


BUSY_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}: busy</title>
<style>body{{font-family:system-ui,sans-serif;max-width:640px;margin:12vh auto;padding:0 16px;color:#222}}
h1{{font-size:1.6em}} a.button{{display:inline-block;background:#1976d2;color:#fff;padding:8px 18px;
border-radius:4px;text-decoration:none;margin-top:8px}}</style></head>
<body class="playground-busy"><h1>{title}</h1>
<p><b>The playground is busy:</b> {sessions} in use. Try again in a minute; a session is freed
within a minute of its page being closed.</p>
<a class="button" href="">Try again</a></body></html>
"""


class KernelCapReached(Exception):
    """No kernel may start: `max_kernels` are alive or starting."""


class CappedKernelManager(AsyncMappingKernelManager):
    """Refuses a kernel beyond `max_kernels` (live + starting); culls kernels of pages left open too."""

    max_kernels = Integer(4, config=True, help="most kernels alive at once (each is one visitor's page)")
    cull_open_timeout = Integer(600, config=True,
                                help="shut down a kernel whose page is still connected after this many "
                                     "idle seconds (0 = never)")
    _starting = 0

    async def start_kernel(self, **kwargs):
        if len(self._kernels) + self._starting >= self.max_kernels:  # no await before the count changes
            raise KernelCapReached
        self._starting += 1
        try:
            return await super().start_kernel(**kwargs)
        finally:
            self._starting -= 1

    async def cull_kernel_if_idle(self, kernel_id):
        await super().cull_kernel_if_idle(kernel_id)  # closed pages: after cull_idle_timeout
        kernel = self._kernels.get(kernel_id)
        if kernel is None or self.cull_open_timeout <= 0 or not hasattr(kernel, "last_activity"):
            return
        idle = utcnow() - kernel.last_activity
        if kernel.execution_state != "busy" and idle > timedelta(seconds=self.cull_open_timeout):
            self.log.warning("Culling kernel %s of a page left open: idle for %d s", kernel_id,
                             idle.total_seconds())
            await self.shutdown_kernel(kernel_id)


class CappedVoilaHandler(TornadoVoilaHandler):
    """The page, or the busy page when no kernel may start (nothing is written before the kernel starts)."""

    async def get(self, path=None):
        try:
            await super().get(path)
        except KernelCapReached:
            self.clear()
            self.set_status(503)
            self.set_header("Retry-After", "30")
            self.set_header("Cache-Control", "no-store")
            self.set_header("Content-Type", "text/html; charset=utf-8")
            cap = self.kernel_manager.max_kernels
            self.finish(BUSY_PAGE.format(title=TITLE, sessions="its only session is" if cap == 1 else
                                         f"all {cap} sessions are"))


class PlaygroundVoila(Voila):
    """Voilà serving the app notebook through CappedVoilaHandler."""

    name = "dsv3-playground"

    def init_handlers(self):
        return [(h[0], CappedVoilaHandler, *h[2:]) if h[1] is TornadoVoilaHandler else h
                for h in super().init_handlers()]


def write_app_notebook(folder: Path, root: Path) -> Path:
    """The app: one code cell that shows the playground on the checkpoints in `root` (Voilà hides the code)."""
    nb = {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"title": TITLE, "kernelspec": {"name": "python3", "display_name": "Python 3",
                                                    "language": "python"}},
        "cells": [{"cell_type": "code", "id": "app", "metadata": {}, "execution_count": None, "outputs": [],
                   "source": f"from dsv3.playground import show\nshow({str(root)!r})"}],
    }
    path = folder / "playground.ipynb"
    path.write_text(json.dumps(nb))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3.playground_server", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", default="checkpoints", help="folder of run folders to offer")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max-kernels", type=int, default=None,
                   help="most visitors at once, one kernel each (0 = what the available memory holds, at most "
                        f"{SESSIONS_PER_CORE} per core; env DSV3_PLAYGROUND_MAX_KERNELS)")
    p.add_argument("--cull-idle", type=int, default=30,
                   help="seconds a closed page's idle kernel lives on")
    p.add_argument("--cull-interval", type=int, default=10, help="seconds between checks for idle kernels")
    p.add_argument("--cull-open", type=int, default=600,
                   help="seconds an open but unused page keeps its kernel (0 = forever)")
    args = p.parse_args(argv)
    if args.max_kernels is None:
        env = os.environ.get("DSV3_PLAYGROUND_MAX_KERNELS", "0")
        if not env.strip().isdigit():
            p.error(f"DSV3_PLAYGROUND_MAX_KERNELS must be an integer >= 0, got {env!r}")
        args.max_kernels = int(env)
    for flag in ("max_kernels", "cull_idle", "cull_interval", "cull_open", "port"):
        if getattr(args, flag) < 0 or (flag in ("cull_idle", "cull_interval", "port") and getattr(args, flag) == 0):
            p.error(f"--{flag.replace('_', '-')} must be {'>= 0' if flag in ('max_kernels', 'cull_open') else '> 0'}, "
                    f"got {getattr(args, flag)}")
    root = Path(args.checkpoints).resolve()
    cap = args.max_kernels or default_max_kernels(root)
    why = "" if args.max_kernels else (f" (the smaller of what the available memory holds, "
                                       f"{memory_max_kernels(root)}, and {SESSIONS_PER_CORE} per core x {cores()} "
                                       f"cores)")
    print(f"{TITLE}: at most {cap} kernels at once{why}, "
          f"memory bound ~{memory_bound_mb(cap, root)} MB (server {SERVER_MB} + {cap} x {kernel_mb(root)} MB); "
          f"closed pages' kernels end after {args.cull_idle} s idle, unused open pages' after {args.cull_open} s",
          flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # kernels inherit the server's environment
    os.environ["DSV3_PLAYGROUND_SESSION_END"] = str(args.cull_open)  # the page says when its session ends
    folder = Path(tempfile.mkdtemp(prefix="dsv3-playground-"))
    nb = write_app_notebook(folder, root)
    try:
        PlaygroundVoila.launch_instance([
            str(nb), f"--port={args.port}", "--no-browser", f"--Voila.ip={args.ip}", "--Voila.port_retries=0",
            f"--Voila.root_dir={folder}",
            f"--VoilaConfiguration.multi_kernel_manager_class={CappedKernelManager.__module__}.CappedKernelManager",
            f"--CappedKernelManager.max_kernels={cap}", f"--CappedKernelManager.cull_open_timeout={args.cull_open}",
            f"--MappingKernelManager.cull_idle_timeout={args.cull_idle}",
            f"--MappingKernelManager.cull_interval={args.cull_interval}",
        ])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if __package__:  # python -m dsv3.playground_server: importing the package loaded torch; restart as a script
        os.execv(sys.executable, [sys.executable, "-P", __file__, *sys.argv[1:]])  # -P: dsv3/ not on sys.path
    sys.exit(main())
