"""bench/bench_long.py --smoke prefills in chunks and decodes on CPU, with a cache sized to each prompt."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "bench_long.py"), "--smoke"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    result = json.loads((tmp_path / "long.json").read_text())
    # prompts of 64 and 200 tokens, 8 decode steps after 3 warm-up ones: the cache holds those slots, no more
    assert [(r["prompt_tokens"], r["cache_slots"]) for r in result["prefill"]] == [(64, 75), (200, 211)]
    assert all(r["prefill_tokens_per_s"] > 0 for r in result["prefill"])
    assert result["decode"]["context"] == 200 and result["decode"]["ms_per_token"] > 0
