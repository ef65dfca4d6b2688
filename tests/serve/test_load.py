"""A `smalto serve` process under a few hundred concurrent requests, valid and invalid mixed: malformed JSON, wrong
types, unknown fields of the wrong type, max_tokens beyond the context, empty messages, prompts longer than the
context, streaming clients that leave mid-stream. Every valid request gets the greedy answer it gets alone, every
invalid one a 400 in OpenAI's shape, every slot is free afterwards (/metrics), and the server's resident memory
comes back to where it was after a warm-up round of the same mix."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from smalto.generate import generate
from smalto.tokenizer import apply_chat_template, has_chat_template
from tests.serve.conftest import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
KEY = "sekrit"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
# RSS growth allowed between the idle server after a warm-up round and after the measured round of 300: glibc keeps
# freed arenas and Python its freed small-object pools, so a round of the same requests moves RSS by a MiB or two
# (1.2 MiB measured); a request that kept one row of logits (50432 floats, 200 KB) would leave 60 MiB
RSS_TOLERANCE_MIB = 16


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smalto", "serve", str(model_dir), "--port", str(port), "--max-batch", "8",
           "--max-queue", "512", "--prefill-chunk", "16", "--device", "cpu", "--served-model-name", "tiny",
           "--api-key", KEY]  # fmt: skip
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(p, url)
        yield p, url
    finally:
        p.kill()
        p.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def wait_idle(url: str, timeout: float = 20) -> str:
    """/metrics once no request is running or waiting (every KV slot free)."""
    deadline = time.time() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        if "smalto_running 0.0" in text and "smalto_queue_length 0.0" in text:
            return text
        assert time.time() < deadline, "slots still held after the load:\n" + text[-2000:]
        time.sleep(0.05)


def clear_margin(loaded, ids: list[int], n: int) -> bool:
    """Whether every one of the n greedy tokens after `ids` wins by a clear logit margin: the batch a request
    lands in changes its logits in the last bits, which may flip a near-tie (tests/serve/test_engine.py checks
    exact equality with fixed batches)."""
    model, tok = loaded
    with torch.no_grad():
        out = generate(model, tok, [ids], max_new_tokens=n, temperature=0)[0].token_ids
        top2 = model(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1].topk(2, dim=-1).values
    return bool((top2[:, 0] - top2[:, 1]).min() > 1e-2)


INVALID: list[tuple[str, str, str]] = [  # (endpoint, body, words the message holds)
    ("completions", '{"prompt": "x", "max_tokens": ', "not valid JSON"),
    ("completions", "[1, 2", "not valid JSON"),
    ("completions", "\xff\xfe{", "not valid JSON"),
    ("completions", '["prompt", "x"]', "must be a JSON object"),
    ("completions", "null", "must be a JSON object"),
    ("completions", '{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
    ("completions", '{"prompt": 3}', "prompt"),
    ("completions", '{"prompt": "x", "temperature": "hot"}', "temperature"),
    ("completions", '{"prompt": "x", "stop": 5}', "stop"),
    ("completions", '{"prompt": "x", "best_answer": {"a": [1, 2]}}', "best_answer"),
    ("completions", '{"prompt": "x", "max_tokens": 500}', "exceed the context"),
    ("completions", '{"prompt": "' + "word " * 120 + '"}', "leave no room"),
    ("completions", '{"max_tokens": 3}', "prompt"),
    ("chat/completions", '{"messages": []}', "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": 5}]}', "content"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x", "mood": [1]}]}', "mood"),
    ("chat/completions", '{"messages": "hello"}', "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 500}', "exceed"),
    (
        "chat/completions",
        '{"messages": [{"role": "user", "content": "' + "word " * 120 + '"}]}',
        "leave no room",
    ),
]
WRONG_PATHS = ["nope", "nope/1", "completion"]


def test_hundreds_of_mixed_requests_answer_right_and_leave_nothing_behind(served, loaded) -> None:
    proc, url = served
    _, tok = loaded
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "under", "over", "blue", "red"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(14)]
    valid: list[tuple[str, dict]] = []
    for t in texts:
        if clear_margin(loaded, tok.encode(t), 4):
            valid.append(("completions", {"prompt": t, "max_tokens": 4, "temperature": 0}))
        messages = [{"role": "user", "content": t}]
        chat_ids = tok.encode(
            apply_chat_template(tok, messages), add_special_tokens=not has_chat_template(tok)
        )
        if clear_margin(loaded, chat_ids, 4):
            valid.append(("chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0}))
    assert sum(e == "completions" for e, _ in valid) >= 5 and sum(e != "completions" for e, _ in valid) >= 5

    def text_of(endpoint: str, r: httpx.Response, stream: bool) -> str:
        if not stream:
            choice = r.json()["choices"][0]
            return choice["text"] if endpoint == "completions" else choice["message"]["content"]
        lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", r.text[-500:]
        chunks = [json.loads(x[6:])["choices"] for x in lines[:-1]]
        key = (
            (lambda c: c.get("text") or "")
            if endpoint == "completions"
            else lambda c: c["delta"].get("content") or ""
        )
        return "".join(key(c[0]) for c in chunks if c)

    with httpx.Client(timeout=60) as http:  # each valid request alone: the answers the load must give
        alone = {
            i: text_of(e, http.post(f"{url}/v1/{e}", json=b, headers=HEADERS), False)
            for i, (e, b) in enumerate(valid)
        }

    def job(r: random.Random) -> Callable[[httpx.Client], str | None]:
        """One random request: returns None when its answer is right, else what went wrong."""
        kind = r.random()
        if kind < 0.5:
            i = r.randrange(len(valid))
            endpoint, body = valid[i]
            stream = r.random() < 0.5

            def send_valid(http: httpx.Client) -> str | None:
                resp = http.post(f"{url}/v1/{endpoint}", json={**body, "stream": stream}, headers=HEADERS)
                if resp.status_code != 200:
                    return f"{body}: {resp.status_code} {resp.text[:300]}"
                got = text_of(endpoint, resp, stream)
                return None if got == alone[i] else f"{body} (stream {stream}) → {got!r}, alone {alone[i]!r}"

            return send_valid
        if kind < 0.85:
            endpoint, raw, words_ = r.choice(INVALID)

            def send_invalid(http: httpx.Client) -> str | None:
                resp = http.post(f"{url}/v1/{endpoint}", content=raw.encode("latin-1"), headers=HEADERS)
                try:
                    err = resp.json()["error"]
                except (ValueError, KeyError, TypeError):
                    return f"{raw[:60]}: {resp.status_code} not an OpenAI error: {resp.text[:300]}"
                if (
                    resp.status_code != 400
                    or err.get("type") != "invalid_request_error"
                    or words_ not in err["message"]
                ):
                    return f"{raw[:60]}: {resp.status_code} {err}"
                return None

            return send_invalid
        if kind < 0.88:
            path = r.choice(WRONG_PATHS)

            def send_nowhere(http: httpx.Client) -> str | None:
                resp = http.post(f"{url}/v1/{path}", json={"prompt": "x"}, headers=HEADERS)
                ok = resp.status_code == 404 and resp.json().get("error", {}).get("type") == "not_found_error"
                return None if ok else f"/v1/{path}: {resp.status_code} {resp.text[:200]}"

            return send_nowhere
        endpoint, body = r.choice(valid)
        leave_after = r.randint(1, 3)

        def send_and_leave(http: httpx.Client) -> str | None:
            """A streaming client that reads a few events of a long answer and disconnects."""
            long = {**body, "max_tokens": 60, "ignore_eos": True, "stream": True}
            with (
                httpx.Client(timeout=60) as own,
                own.stream("POST", f"{url}/v1/{endpoint}", json=long, headers=HEADERS) as resp,
            ):
                if resp.status_code != 200:
                    return f"stream {body}: {resp.status_code}"
                for n, _ in enumerate(resp.iter_lines()):
                    if n >= leave_after:
                        break
            return None

        return send_and_leave

    local, clients, lock = threading.local(), [], threading.Lock()

    def run(f: Callable[[httpx.Client], str | None]) -> str | None:
        if not hasattr(
            local, "http"
        ):  # one client per thread: a client is not meant to be shared across threads
            local.http = httpx.Client(timeout=60)
            with lock:
                clients.append(local.http)
        return f(local.http)

    def round_of(n: int, seed: int) -> list[str]:
        r = random.Random(seed)
        jobs = [job(r) for _ in range(n)]
        with ThreadPoolExecutor(24) as pool:
            return [w for w in pool.map(run, jobs) if w is not None]

    start = time.time()
    wrong = round_of(80, 1)  # warm-up: allocator pools, tokenizer caches, every code path once
    assert not wrong, f"{len(wrong)} of 80 warm-up requests went wrong, e.g. {wrong[:3]}"
    wait_idle(url)
    idle = rss_mib(proc.pid)
    wrong = round_of(300, 2)
    assert not wrong, f"{len(wrong)} of 300 requests went wrong, e.g. {wrong[:3]}"
    metrics = wait_idle(url)
    after = rss_mib(proc.pid)
    for c in clients:
        c.close()
    assert time.time() - start < 120, "the load took far longer than it should (a stalled request?)"
    assert after - idle <= RSS_TOLERANCE_MIB, (
        f"server RSS {idle:.0f} MiB idle after warm-up, {after:.0f} after load"
    )
    assert 'smalto_requests_total{endpoint="/v1/completions",status="400"}' in metrics
    assert 'smalto_requests_total{endpoint="/v1/chat/completions",status="400"}' in metrics
    assert "/v1/nope" not in metrics  # unknown paths are counted as "other", not one series each
    assert 'endpoint="other",status="404"' in metrics
