"""bench/quant_kernels.py --smoke runs on CPU: each way of the quantized decode-linear kernel through Triton's
interpreter, each equal to the float32 product with the dequantized weight."""

import json
import os
import sys
from pathlib import Path

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def test_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "quant_kernels.py"), "--smoke"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    rows = json.loads((tmp_path / "quant_kernels.json").read_text())["rows"]
    variants = {"bf16:cublas", "int8:base", "int8:magic", "int4:base"}
    assert {r["variant"] for r in rows} == variants
    assert {r["batch"] for r in rows} == {1, 3}  # the one-row and the tensor-core paths
    for r in rows:
        assert "error" not in r, r
        assert r["err"] < 1e-5, r
