"""The playground as a web page: Voila serves notebook 05 on 127.0.0.1:7860 and real headless Chromium
(Debian's `chromium`, driven by Playwright) types a prompt, clicks Generate and reads the streamed text.

Skips with the reason when chromium or Playwright is missing (`make test` installs chromium when it runs as
root with apt). The model is a randomly initialised tiny checkpoint: the page only has to generate something.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import dsv3
from dsv3.data import get_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
PORT = 7860
URL = f"http://127.0.0.1:{PORT}"
NOTEBOOK = ROOT / "notebooks" / "05_playground.ipynb"

if not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
                "`make test` does this when run as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install dsv3[web])")
VOILA = Path(sys.executable).with_name("voila")
if not VOILA.exists():
    pytest.skip("voila is not installed (pip install dsv3[web])", allow_module_level=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not _port_free(PORT):
        pytest.fail(f"port {PORT} is already in use (is `make playground` running?); the test needs it")
    tmp = tmp_path_factory.mktemp("playground")
    torch.manual_seed(0)
    ckpt = dsv3.save_checkpoint(tmp / "run", dsv3.DeepSeekV3(dsv3.ModelConfig.preset("tiny")), step=0)
    log = open(tmp / "voila.log", "wb")
    proc = subprocess.Popen(
        [str(VOILA), str(NOTEBOOK), f"--port={PORT}", "--no-browser", "--Voila.ip=127.0.0.1",
         "--MappingKernelManager.cull_idle_timeout=120", "--MappingKernelManager.cull_interval=30"],
        env={**os.environ, "DSV3_CHECKPOINT": str(ckpt)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, cwd=ROOT)
    try:
        deadline = time.time() + 90
        while True:  # a static asset: probing "/" would start a kernel
            try:
                with urllib.request.urlopen(f"{URL}/voila/templates/lab/static/voila.js", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"voila did not start:\n{(tmp / 'voila.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield URL
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # voila shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_page_generates_text(server):
    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page()
            # offline: only our server (the page also asks a CDN for icon fonts)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server)
                       else route.abort())
            page.goto(server, timeout=120_000)
            prompt = page.locator(".gen-prompt textarea")
            prompt.wait_for(timeout=180_000)
            page.locator(".gen-output").filter(has_text="ROMEO:").wait_for(timeout=120_000)  # the example ran

            # max new tokens is bounded in the UI: a huge value is clamped to the largest allowed
            box = page.locator(".gen-max-tokens input")
            box.fill("100000")
            box.press("Enter")
            limit = min(500, dsv3.ModelConfig.preset("tiny").max_seq_len - 1)
            page.wait_for_function(f"document.querySelector('.gen-max-tokens input').value == '{limit}'",
                                   timeout=10_000)
            box.fill("12")
            box.press("Enter")

            prompt.fill("JULIET:")
            prompt.press("Tab")
            page.get_by_role("button", name="Generate").click()
            out = page.locator(".gen-output").filter(has_text="JULIET:")
            out.wait_for(timeout=120_000)
            routing = page.locator(".gen-routing").filter(has_text="top-1 routed expert")
            routing.wait_for(timeout=120_000)
            text = out.inner_text()
            assert text.startswith("JULIET:") and len(text) > len("JULIET:"), text
            tokens = routing.locator("span[title^='expert']").count()  # one span per routed token
            n_prompt = len(get_tokenizer().encode_ordinary("JULIET:"))
            assert n_prompt < tokens <= n_prompt + 12  # the 12 from the box reached the kernel
            assert routing.inner_text().count("expert ") >= 8  # the legend: one entry per routed expert
        finally:
            browser.close()
