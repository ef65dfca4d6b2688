"""`smalto serve` as a real process: it serves, and SIGTERM stops admitting, lets a running stream finish, exits 0.
The chat page in a real headless Chromium: send a message, see the streamed answer appear."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests import forkrun
from tests.serve.conftest import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def proc_server(model_dir: Path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smalto", "serve", str(model_dir), "--port", str(port), "--max-batch", "2",
           "--device", "cpu", "--served-model-name", "tiny", "--grace", "20"]  # fmt: skip
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(p, url)
    yield p, url
    if p.poll() is None:
        p.kill()
        p.wait()


def test_chat_page_streams_an_answer_in_chromium(proc_server) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    assert chromium, "the Debian package chromium is needed (.ci/run installs it)"
    _, url = proc_server
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=args)
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        page.fill("#max_tokens", "12")
        page.fill("#temperature", "0")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.user")
        page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0")
        page.wait_for_function("!document.getElementById('send').disabled")  # the stream ended
        answer = page.text_content(".msg.assistant")
        browser.close()
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0, "top_p": 0.95})  # fmt: skip
    assert answer == r.json()["choices"][0]["message"]["content"] != ""


def test_sigterm_drains_and_exits_zero(proc_server) -> None:
    p, url = proc_server
    got: list[str] = []
    body = {"prompt": "Slowly", "max_tokens": 60, "temperature": 0, "stream": True, "ignore_eos": True}

    def stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            got.extend(x for x in r.iter_lines() if x)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while "smalto_running 1.0" not in httpx.get(url + "/metrics").text:
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert p.wait(timeout=60) == 0
    assert got[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in got[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the running request finished in full
    with pytest.raises(httpx.TransportError):  # and nothing is admitted any more
        httpx.post(url + "/v1/completions", json={"prompt": "x"})


def test_a_missing_model_exits_2_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "smalto", "serve", str(tmp_path / "nope"), "--port", str(free_port())]
    p = forkrun.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
    assert str(tmp_path / "nope") in p.stderr
