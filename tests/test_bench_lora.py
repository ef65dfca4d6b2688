"""bench/bench_lora.py --smoke runs smalto's LoRA step under full and selective checkpointing, and PEFT's, on CPU."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    out = tmp_path / "out"  # made by the bench
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "bench_lora.py"), "--smoke", "--only", "smalto-lora,peft",
         "--ac-mode", "full,selective", "--steps", "1", "--warmup", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((out / "bench_lora.json").read_text())
    assert [r["name"] for r in rows] == ["smalto-lora (ac full)", "smalto-lora (ac selective)", "peft"]
    for r in rows:
        assert "error" not in r and r["tokens_per_s"] > 0
    # the adapters alone train, the same ones under either checkpointing
    assert rows[0]["trainable"] == rows[1]["trainable"] > 0
