"""optimizer.offload = cpu on CUDA: the streamed step (side streams, pinned CPU state) equals the wrapped optimizer
on the GPU bit for bit, for torch's fused AdamW, AdamW with bf16 moments and LION, over several chunks; the state
stays in pinned CPU memory; a state_dict round trip keeps it there."""

import pytest
import torch

from smalto.config import OptimizerConfig
from smalto.train.optim import build_optimizer

pytestmark = pytest.mark.gpu


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256) for _ in range(6)]
    return torch.nn.Sequential(*layers).cuda()


@pytest.mark.parametrize(
    "opt",
    [
        {"name": "adamw", "weight_decay": 0.1},
        {"name": "adamw", "state_dtype": "bf16", "weight_decay": 0.1},
        {"name": "lion", "weight_decay": 1e-3},
    ],
    ids=["adamw-fused", "adamw-bf16", "lion"],
)
def test_streamed_step_equals_the_gpu_step(opt):
    ref, mine = _model(), _model()
    plain = build_optimizer(ref, OptimizerConfig(lr=1e-3, **opt))
    offloaded = build_optimizer(mine, OptimizerConfig(lr=1e-3, offload="cpu", **opt))
    offloaded.chunk_elements = 100_000  # 7 chunks in flight per step
    for step in range(5):
        x = torch.randn(32, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for model, o in ((ref, plain), (mine, offloaded)):
            model(x).square().mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for a, b in zip(ref.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
        for k, v in plain.state[p].items():
            got = offloaded.state[q][k]
            if got.dim() > 0:
                assert got.device.type == "cpu" and got.is_pinned(), k
            torch.testing.assert_close(got.to(v.device), v, rtol=0, atol=0)
    again = build_optimizer(mine, OptimizerConfig(lr=1e-3, offload="cpu", **opt))
    again.load_state_dict(offloaded.state_dict())
    assert all(v.device.type == "cpu" for st in again.state.values() for v in st.values() if v.dim() > 0)


@pytest.mark.parametrize("step", [1, 2], ids=["first-step", "later-step"])
def test_the_gpu_holds_a_few_chunks_of_state_at_a_time(step):
    """The first step creates the state and every step moves it: neither holds more than a few chunks of it on the
    GPU at once (the host waits for a chunk's copy back before taking memory for another)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(16)]).cuda()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, offload="cpu"))
    opt.chunk_elements = 1 << 20  # one layer a chunk: 8 MiB of AdamW state, 128 MiB in all
    chunk_state = 2 * 4 * (1 << 20)
    for _ in range(step):
        model(torch.randn(8, 1024, device="cuda")).square().mean().backward()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
    assert torch.cuda.max_memory_allocated() - base <= 4 * chunk_state
