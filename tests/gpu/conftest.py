"""GPU test settings. The decode-linear kernel autotunes over two configurations here, not its full space: the tests
check results, not speed, and the full space costs minutes of compilation per weight shape on a fresh machine (the
suite overran a 10-minute device call three sessions running). The two keep a narrow and a wide tile, so ragged N
and K still meet masked tiles of both kinds."""

import pytest

from smalto.kernels import decode_linear


def _two_configs(triton, rows: int, quant: bool = False) -> list:
    narrow, wide = (8, 64) if rows == 1 else (16, 64)  # a tensor-core tile needs BLOCK_N ≥ 16
    return [
        triton.Config({"BLOCK_N": narrow, "BLOCK_K": 512}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": wide, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    ]


@pytest.fixture(autouse=True, scope="session")
def _quick_decode_linear_tuning():
    assert decode_linear._OP is None, "set before the op is built"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_linear, "_configs", _two_configs)
        yield
