"""bench/bench_finetune.py --smoke runs on CPU and fills packed rows better than one example a row."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--smoke", "--optimizers", "adamw-bf16-offload"]
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "bench_finetune.py"), *args],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    rows = json.loads((tmp_path / "bench_finetune.json").read_text())
    packed, single = (next(r for r in rows if r["packing"] is flag) for flag in (True, False))
    assert packed["fill"] > 2 * single["fill"] and packed["real_tokens_per_s"] > 0
