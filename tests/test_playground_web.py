"""The playground as a web app: `python -m dsv3.playground_server` (Voilà) on 127.0.0.1, driven by real headless
Chromium (Debian's `chromium`, through Playwright).

  test_page_is_an_app    one visitor: a titled page with only the app, nothing generated at load, limits written
                         beside the inputs and out-of-range values refused with a message, streaming with a
                         status line, Stop, the routing colours; a second visitor beyond the cap (1) gets the
                         busy page; the open page keeps its kernel past the idle timeout, the closed one loses it
  test_twenty_visitors   20 pages at once against a cap of 3 kernels: each either generates or gets the busy
                         page, the server stays up, the resident memory of the server and its kernels (summed
                         from /proc) stays under the bound it documents, closed pages' kernels are culled
                         within a minute, and a new visitor then gets a kernel
Skips with the reason when chromium, Playwright or Voilà is missing (`make test` installs chromium when it runs as
root with apt). The model is a randomly initialised tiny checkpoint: the page only has to generate something.
DSV3_SCREENSHOTS=<folder> (with DSV3_SCREENSHOT_RUNS=<checkpoints folder> for a trained model) also saves the
pages as PNGs: playground_idle.png, playground_busy.png, playground_generating.png, playground_done.png.
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import dsv3
from dsv3.playground import checkpoint_choices

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = os.environ.get("DSV3_SCREENSHOTS")

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
                "`make test` does this when run as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install dsv3[web])")
async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install dsv3[web])")
pytest.importorskip("voila", reason="voila is not installed (pip install dsv3[web])")
from dsv3 import playground_server as srv  # noqa: E402  (needs voila)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _kernels(pid: int) -> int:
    n = 0
    for p in _tree(pid)[1:]:
        try:
            n += b"ipykernel_launcher" in Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            pass
    return n


class MemoryWatch(threading.Thread):
    """Samples the summed VmRSS of a process tree (the server and its kernels) every 0.2 s; keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.peak_kernels, self.done = pid, 0.0, 0, threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            tree = _tree(self.pid)
            self.peak_mb = max(self.peak_mb, sum(_rss_mb(p) for p in tree))
            self.peak_kernels = max(self.peak_kernels, _kernels(self.pid))


@contextmanager
def serve(tmp: Path, runs: Path, *flags: str):
    """The playground server on a free port; yields (url, process, its first log line)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / f"server-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.playground_server", "--checkpoints", str(runs),
                             "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:  # a static asset: probing "/" would start a kernel
            try:
                with urllib.request.urlopen(f"{url}/voila/templates/lab/static/voila.js", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the playground server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc, log_path.read_text().splitlines()[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # Voilà shuts its kernels down on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if os.environ.get("DSV3_SCREENSHOT_RUNS"):
        return Path(os.environ["DSV3_SCREENSHOT_RUNS"]).resolve()
    tmp = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny"))
    dsv3.save_checkpoint(tmp / "tiny", model, step=0)
    dsv3.save_checkpoint(tmp / "tiny", model, step=0, best=True)  # what training's first validation writes
    dsv3.save_checkpoint(tmp / "tiny", model, step=1)  # a newer step: the page still opens best/
    return tmp


def _offline(url):
    # only our server (the page also asks a CDN for icon fonts)
    return lambda route: route.continue_() if route.request.url.startswith(url) else route.abort()


@pytest.mark.slow
def test_page_is_an_app(runs, tmp_path):
    L = dsv3.ModelConfig.preset("tiny").max_seq_len
    with serve(tmp_path, runs, "--max-kernels", "1", "--cull-idle", "6", "--cull-interval", "2") as (url, proc, _), \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 820})
            page.route("**/*", _offline(url))
            page.goto(url, timeout=120_000)
            prompt = page.locator(".gen-prompt textarea")
            prompt.wait_for(timeout=180_000)
            assert page.title() == "dsv3 playground"
            assert page.locator(".gen-title").inner_text().strip() == "dsv3 playground"
            body = page.locator("body").inner_text()
            assert "05 ·" not in body and "make playground" not in body and "import" not in body  # the app only
            assert page.locator(".gen-output").inner_text().strip() == ""  # nothing generated at load
            assert "session ends after 10 min without use" in page.locator(".gen-session-note").inner_text()
            options = page.locator(".gen-checkpoint select").inner_text().replace("\xa0", " ")  # widgets: nbsp
            assert checkpoint_choices(runs)[0][0] in options
            opened = page.locator(".gen-checkpoint select").evaluate("e => e.options[e.selectedIndex].text")
            opened = opened.replace("\xa0", " ")
            assert opened == checkpoint_choices(runs)[0][0] and (SHOTS or opened == "tiny/best (step 0)")
            assert "this model has no MTP layers" in page.locator(".gen-speculative").inner_text()
            shown, cut = page.locator(".gen-app").evaluate(  # every visible label, and those cut off
                "app => { const ls = [...app.querySelectorAll('.widget-label, .widget-label-basic, label')]"
                ".filter(e => e.offsetParent && e.textContent.trim());"
                " return [ls.map(e => e.textContent), ls.filter(e => e.scrollWidth > e.clientWidth + 1)"
                ".map(e => e.textContent)]; }")
            assert cut == [], cut
            assert {"max new tokens", "colour by expert of"} <= set(shown), shown
            assert any("no MTP layers" in t for t in shown), shown
            hint = page.locator(".gen-hint-max-new-tokens")
            assert f"1-{L - 1} for this model" in hint.inner_text()
            if SHOTS:
                page.screenshot(path=f"{SHOTS}/playground_idle.png")

            # a second visitor beyond the cap of 1 gets the busy page, not a kernel
            other = browser.new_page(viewport={"width": 900, "height": 420})
            other.route("**/*", _offline(url))
            resp = other.goto(url, timeout=60_000)
            assert resp.status == 503 and "busy" in other.locator(".playground-busy").inner_text()
            if SHOTS:
                other.screenshot(path=f"{SHOTS}/playground_busy.png")
            other.close()

            # out of range: a message beside the box, the value kept, nothing generated
            box = page.locator(".gen-max-tokens input")
            box.fill("9999")
            box.press("Enter")
            hint.filter(has_text="9999 is out of range").wait_for(timeout=10_000)
            assert box.input_value() == "9999"  # not clamped
            page.get_by_role("button", name="Generate").click()
            page.locator(".gen-status").filter(has_text="fix the settings").wait_for(timeout=10_000)
            assert page.locator(".gen-output").inner_text().strip() == ""

            # the open page keeps its kernel past the idle timeout (6 s): it is connected
            time.sleep(10)
            assert _kernels(proc.pid) == 1

            # streaming with a status line, then Stop ends it early
            box.fill(str(L - 10))
            box.press("Enter")
            prompt.fill("JULIET:")
            prompt.press("Tab")
            page.get_by_role("button", name="Generate").click()
            status = page.locator(".gen-status")
            at_least = r"([2-9]\d|\d{3})" if SHOTS else r"([3-9]|\d\d+)"  # tokens before Stop (more for a picture)
            status.filter(has_text=re.compile(rf"generating · {at_least} tokens · [\d.]+ tokens/s · [\d.]+ s")) \
                .wait_for(timeout=120_000)
            if SHOTS:
                page.screenshot(path=f"{SHOTS}/playground_generating.png")
            page.get_by_role("button", name="Stop").click()
            status.filter(has_text="stopped").wait_for(timeout=30_000)
            n_stopped = int(re.search(r"(\d+) tokens", status.inner_text()).group(1))
            assert 3 <= n_stopped < L - 10
            out = page.locator(".gen-output")
            assert out.inner_text().startswith("JULIET:")
            assert out.locator(".gen-text").evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"
            page.locator(".gen-legend").filter(has_text="expert 0").wait_for(timeout=30_000)
            n_prompt = len(dsv3.data.get_tokenizer().encode_ordinary("JULIET:"))
            assert out.locator("span[title^='expert']").count() == n_prompt + n_stopped  # one span per token

            # a short run to the end: the number typed in the box reached the kernel
            n = 60 if SHOTS else 12
            box.fill(str(n))
            box.press("Enter")
            page.get_by_role("button", name="Generate").click()
            status.filter(has_text=re.compile("max new tokens reached|end of text")).wait_for(timeout=120_000)
            assert int(re.search(r"(\d+) tokens", status.inner_text()).group(1)) <= n
            page.locator(".gen-legend").filter(has_text="expert 0").wait_for(timeout=30_000)
            if SHOTS:
                page.screenshot(path=f"{SHOTS}/playground_done.png")

            # closed: the kernel goes within cull-idle + cull-interval (+ slack)
            page.close()
            t0 = time.time()
            while _kernels(proc.pid) and time.time() - t0 < 40:
                time.sleep(1)
            assert _kernels(proc.pid) == 0, "the closed page's kernel was not culled"
            assert proc.poll() is None
        finally:
            browser.close()


async def _visit(browser, url: str, max_new_tokens: int) -> tuple[str, object]:
    ctx = await browser.new_context(viewport={"width": 900, "height": 700})
    page = await ctx.new_page()

    async def offline(route):
        await (route.continue_() if route.request.url.startswith(url) else route.abort())

    await page.route("**/*", offline)
    await page.goto(url, wait_until="commit", timeout=180_000)
    app, busy = page.locator(".gen-prompt textarea"), page.locator(".playground-busy")
    await app.or_(busy).first.wait_for(timeout=180_000)
    if await busy.count():
        assert "busy" in await busy.inner_text()
        return "busy", ctx
    box = page.locator(".gen-max-tokens input")
    await box.fill(str(max_new_tokens))
    await box.press("Enter")
    await page.get_by_role("button", name="Generate").click()
    await page.locator(".gen-status").filter(has_text=re.compile("max new tokens reached|end of text")) \
        .wait_for(timeout=180_000)
    assert len(await page.locator(".gen-output").inner_text()) > len("ROMEO:")
    return "generated", ctx


async def _crowd(url: str, n: int, max_new_tokens: int, close: bool = True) -> list[str]:
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            results = await asyncio.gather(*(_visit(browser, url, max_new_tokens) for _ in range(n)))
            for _, ctx in results:
                await ctx.close()
            return [r for r, _ in results]
        finally:
            await browser.close()


@pytest.mark.slow
def test_twenty_visitors(runs, tmp_path):
    cap = 3
    # closed pages' kernels: culled after 10 s idle, checked every 3 s (the defaults, 30 s and 10 s, take longer)
    with serve(tmp_path, runs, "--max-kernels", str(cap), "--cull-idle", "10", "--cull-interval", "3") \
            as (url, proc, banner):
        bound = int(re.search(r"bound ~?(\d+) MB", banner).group(1))
        assert bound == srv.memory_bound_mb(cap, runs)
        watch = MemoryWatch(proc.pid)
        watch.start()
        t0 = time.time()
        results = asyncio.run(_crowd(url, 20, 8))
        took = time.time() - t0
        closed = time.time()
        while _kernels(proc.pid) and time.time() - closed < 60:
            time.sleep(1)
        culled_after = time.time() - closed
        left = _kernels(proc.pid)
        again = asyncio.run(_crowd(url, 1, 4))  # a slot is free again
        watch.done.set()
        watch.join()
        server_mb = _rss_mb(proc.pid)
        generated, busy = results.count("generated"), results.count("busy")
        print(f"\n20 visitors, cap {cap}: {generated} generated, {busy} got the busy page in {took:.0f} s; "
              f"peak {watch.peak_kernels} kernels, peak RSS server + kernels {watch.peak_mb:.0f} MB "
              f"(documented bound {bound} MB; the server alone {server_mb:.0f} MB at the end); "
              f"closed pages' kernels gone "
              f"after {culled_after:.0f} s")
        assert generated + busy == 20 and 1 <= generated <= cap
        assert watch.peak_kernels <= cap
        assert watch.peak_mb < bound
        assert left == 0, f"{left} kernels left {culled_after:.0f} s after closing"
        assert server_mb < srv.SERVER_MB
        assert again == ["generated"]
        assert proc.poll() is None  # the server stayed up
