"""bench/bench_qlora.py --smoke runs on CPU: an NF4 base built block by block, adapters trained through it."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "bench_qlora.py"), "--smoke"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    (row,) = json.loads((tmp_path / "bench_qlora.json").read_text())
    # r 16 on Wqkv (128→384), out_proj (128→128), up (128→512), down (512→128), 2 blocks
    assert row["trainable_params"] == 2 * 16 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    assert row["adapters_trained"] is True
    assert 0 < row["loss"] < 20
