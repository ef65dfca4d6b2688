"""bench/bench_dpo.py --smoke runs DPO steps on CPU and counts the pairs' real tokens."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "bench_dpo.py"), "--smoke"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    (row,) = json.loads((tmp_path / "bench_dpo.json").read_text())
    # 4 pairs of 2 rows, each with a prompt of 12-63 and a completion of 4-37 tokens
    tokens_per_step = row["real_tokens_per_s"] * row["step_s"]
    assert 8 * (12 + 4) <= tokens_per_step <= 8 * (63 + 37) and row["loss"] > 0
