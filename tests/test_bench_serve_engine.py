"""bench/serve_engine.py --smoke drives the serving engine with the load's requests on CPU and splits its steps."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "serve_engine.py"), "--smoke", "--random"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    rows = json.loads((tmp_path / "serve_engine.json").read_text())["rows"]
    assert [r["prefill_chunk"] for r in rows] == [16, 64]
    for r in rows:
        # 8 requests' prompts went in over steps that prefilled, at most a chunk of prompt tokens each
        assert r["prefill_step"]["n"] > 0 and 0 < r["prefill_tokens_per_prefill_step"] <= r["prefill_chunk"]
        assert r["steps"] > r["prefill_step"]["n"] and r["output_tokens_per_s"] > 0
        assert 0 < r["ttft"]["p50"] <= r["ttft"]["p99"] and r["tpot"]["p50"] > 0
    # a smaller chunk spreads the same prompts over more prefill steps
    assert rows[0]["prefill_step"]["n"] > rows[1]["prefill_step"]["n"]
