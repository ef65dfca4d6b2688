"""`smalto serve --quantize`: a real server process on a quantized tiny model (int4 blocks and head) answers a
greedy completion with what `smalto generate` with the same flags prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from smalto.generate import generate
from tests import forkrun
from tests.helpers import greedy_generate_args
from tests.serve.conftest import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
QUANT = ["--quantize", "int4", "--group-size", "32", "--quantize-head"]


def test_served_quantized_model_answers_as_generate_does(model_dir: Path, loaded) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "smalto",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        *QUANT,
    ]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # the reference runs while the server starts
        gen = forkrun.run(
            [sys.executable, "-m", "smalto", *greedy_generate_args(model_dir, *QUANT)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert gen.returncode == 0, gen.stderr
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(server, url)
        r = httpx.post(
            url + "/v1/completions",
            json={"prompt": "Hello world", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["text"] + "\n" == gen.stdout
        (bf16,) = generate(*loaded, ["Hello world"], max_new_tokens=8, temperature=0)
        assert (
            body["choices"][0]["text"] != bf16.text
        )  # int4 changes this model's answer: the flag is applied
    finally:
        server.kill()
        server.wait()
