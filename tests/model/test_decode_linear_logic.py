"""smalto/model/decode_linear.py: the kernel's logic on CPU through Triton's interpreter equals x · wᵀ at decode
shapes (one row on CUDA cores, a few rows on the tensor-core path, ragged edges), and the op traces in one graph.
On a GPU, tests/gpu/test_decode_linear.py checks the autotuned kernel and the model's use of it."""

import pytest
import torch

from smalto.model import decode_linear
from tests.model.helpers import use_triton_interpreter

use_triton_interpreter()


@pytest.fixture(autouse=True)
def _built():
    assert decode_linear.prepare(), "Triton is installed: the op must build"


@pytest.mark.parametrize("M,N,K", [(1, 96, 256), (1, 70, 200), (5, 96, 128), (16, 64, 192), (3, 50, 100)])
def test_kernel_equals_matmul(M, N, K):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    assert decode_linear._OP is not None
    torch.testing.assert_close(decode_linear._OP(x, w), x @ w.T, atol=1e-4, rtol=1e-4)


def test_op_traces_in_one_graph():
    w = torch.randn(32, 64)
    assert decode_linear._OP is not None
    op = decode_linear._OP
    f = torch.compile(lambda x: op(x, w) * 2, backend="eager", fullgraph=True)
    x = torch.randn(1, 64)
    torch.testing.assert_close(f(x), 2 * (x @ w.T), atol=1e-4, rtol=1e-4)


def test_cpu_inputs_take_f_linear():  # the CUDA conditions: tests/gpu/test_decode_linear.py
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not decode_linear.supports(x, w)  # CPU: F.linear
        got = decode_linear.linear(x, w, torch.ones(8, dtype=torch.bfloat16))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, torch.ones(8, dtype=torch.bfloat16)))
