"""bench/triton_gemv.py (an experiment `bench/decode_kernels.py tgemv` times against cuBLAS): its kernel's logic
on CPU through Triton's interpreter equals x · wᵀ for decode shapes, ragged edges included."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.model.helpers import use_triton_interpreter

use_triton_interpreter()

_spec = importlib.util.spec_from_file_location(
    "triton_gemv", Path(__file__).parents[2] / "bench" / "triton_gemv.py"
)
assert _spec is not None and _spec.loader is not None
triton_gemv = importlib.util.module_from_spec(_spec)
sys.modules["triton_gemv"] = triton_gemv  # torch.compile looks functions' modules up by name
_spec.loader.exec_module(triton_gemv)


@pytest.mark.parametrize("M,N,K", [(1, 96, 256), (1, 70, 200), (5, 96, 128), (16, 64, 192), (3, 50, 100)])
def test_gemv_equals_matmul(M, N, K):
    triton_gemv.build(autotune=False)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    torch.testing.assert_close(triton_gemv.gemv(x, w), x @ w.T, atol=1e-4, rtol=1e-4)


def test_gemv_traces_in_one_graph():
    triton_gemv.build(autotune=False)
    w = torch.randn(32, 64)
    f = torch.compile(lambda x: triton_gemv.gemv(x, w) * 2, backend="eager", fullgraph=True)
    x = torch.randn(1, 64)
    torch.testing.assert_close(f(x), 2 * (x @ w.T), atol=1e-4, rtol=1e-4)
