"""Tokens/s of each playground session at the server's default cap, under N page loads at once.

    python benchmarks/playground_sessions.py --checkpoints checkpoints            # 20 pages, 100 new tokens each
    python benchmarks/playground_sessions.py --pages 20 --max-new-tokens 100 --max-kernels 0

Starts `python -m dsv3.playground_server` (its default cap unless --max-kernels N > 0), opens --pages pages at once
in headless Chromium (Debian's /usr/bin/chromium through Playwright, as tests/test_playground_web.py), and in every
page that gets a session presses Generate with --max-new-tokens and waits for the end. Each session's figure is
its own status line: generated tokens / elapsed seconds, prefill included (playground.Playground.run). Prints the
cap, the cores, how many pages got a session or the busy page, and min / median / max tokens/s per session, as
JSON. Every session generates at the same time, so this is the worst case the cap admits. It needs a quiet
machine: any other load lowers every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def start_server(checkpoints: str, max_kernels: int) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.playground_server", "--checkpoints", checkpoints,
                             "--port", str(port), "--max-kernels", str(max_kernels)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = proc.stdout.readline().strip()  # "dsv3 playground: at most N kernels at once (...)"
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining: a full pipe would block it
    deadline = time.time() + 120
    while time.time() < deadline:  # a static asset: probing "/" would start a kernel
        try:
            with urllib.request.urlopen(f"{url}/voila/templates/lab/static/voila.js", timeout=5):
                return proc, url, first
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the playground server did not start: {first}")


async def visit(browser, url: str, max_new_tokens: int) -> float | None:
    """One page: its session's tokens/s, or None for the busy page."""
    ctx = await browser.new_context()
    page = await ctx.new_page()
    await page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
    try:
        await page.goto(url, wait_until="commit", timeout=300_000)
        app, busy = page.locator(".gen-prompt textarea"), page.locator(".playground-busy")
        await app.or_(busy).first.wait_for(timeout=300_000)
        if await busy.count():
            return None
        box = page.locator(".gen-max-tokens input")
        await box.fill(str(max_new_tokens))
        await box.press("Enter")
        await page.get_by_role("button", name="Generate").click()
        status = page.locator(".gen-status").filter(has_text=re.compile("max new tokens reached|end of text"))
        await status.wait_for(timeout=600_000)
        return float(re.search(r"([\d.]+) tokens/s", await status.inner_text()).group(1))
    finally:
        await ctx.close()


async def crowd(url: str, pages: int, max_new_tokens: int) -> list[float | None]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            return await asyncio.gather(*(visit(browser, url, max_new_tokens) for _ in range(pages)))
        finally:
            await browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", default="checkpoints", help="folder of run folders (the server's)")
    ap.add_argument("--pages", type=int, default=20, help="page loads at once")
    ap.add_argument("--max-new-tokens", type=int, default=100, help="tokens each session generates")
    ap.add_argument("--max-kernels", type=int, default=0, help="the server's cap (0 = its default)")
    args = ap.parse_args()
    proc, url, first = start_server(args.checkpoints, args.max_kernels)
    try:
        rates = asyncio.run(crowd(url, args.pages, args.max_new_tokens))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    got = [r for r in rates if r is not None]
    print(json.dumps({"server": first, "cores": len(os.sched_getaffinity(0)), "pages": args.pages,
                      "sessions": len(got), "busy": len(rates) - len(got), "max_new_tokens": args.max_new_tokens,
                      "tokens_per_s": {"min": min(got, default=None), "median": statistics.median(got) if got else None,
                                       "max": max(got, default=None)}}, indent=2))


if __name__ == "__main__":
    main()
