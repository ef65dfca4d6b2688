"""DecoupledLionW against lion-pytorch, AdamW against torch, schedules against torch's schedulers / formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lion_pytorch import Lion

from smalto.config import OptimizerConfig, SchedulerConfig, duration_steps
from smalto.errors import ConfigError
from smalto.train import optim
from smalto.train.optim import DecoupledLionW, Schedule, _chunks, build_optimizer


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _run_pair(ours, ref, a, b, lrs):
    for step, lr in enumerate(lrs):
        torch.manual_seed(100 + step)
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        for opt, model in ((ours, a), (ref, b)):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98)])
@pytest.mark.parametrize(
    "chunk", [None, 100]
)  # 100 elements: the four tensors (512, 32, 128, 4), one call each
def test_lion_matches_lion_pytorch_without_decay(betas, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(optim, "CHUNK_ELEMENTS", chunk)
    a = _model()
    b = copy.deepcopy(a)
    ours = DecoupledLionW(a.parameters(), lr=1e-3, betas=betas, weight_decay=0.0)
    ref = Lion(b.parameters(), lr=1e-3, betas=betas, weight_decay=0.0)
    _run_pair(ours, ref, a, b, [1e-3] * 20)


def test_lion_decoupled_decay_is_scaled_by_the_schedule():
    # llm-foundry: p ← p·(1 − wd·lr/initial_lr); lion-pytorch's decoupled_weight_decay divides wd by the initial lr
    a = _model()
    b = copy.deepcopy(a)
    ours = DecoupledLionW(a.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=1e-2)
    ref = Lion(b.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=1e-2, decoupled_weight_decay=True)
    lrs = [2e-3 * (0.5 + 0.5 * math.cos(math.pi * i / 15)) for i in range(15)]
    _run_pair(ours, ref, a, b, lrs)


def test_chunks_bound_each_foreach_call():
    assert _chunks([512, 32, 128, 4], 100) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]
    assert _chunks([10, 20, 30], 60) == [slice(0, 3)]
    assert _chunks([10, 20, 30], 59) == [slice(0, 2), slice(2, 3)]
    assert _chunks([], 10) == []


def test_lion_decay_formula_on_zero_gradient():
    p = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = DecoupledLionW([p], lr=1e-2, weight_decay=0.1)
    opt.param_groups[0]["lr"] = (
        5e-3  # half the peak: half the decay; a zero gradient has sign 0, so no update
    )
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))


def test_adamw_is_torch_adamw():
    a = _model()
    b = copy.deepcopy(a)
    ours = build_optimizer(a, OptimizerConfig(name="adamw", lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1))
    ref = torch.optim.AdamW(
        b.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, foreach=False
    )
    _run_pair(ours, ref, a, b, [1e-3] * 10)


def _torch_lrs(sched_fn, peak: float, n: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = sched_fn(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _ours(cfg: SchedulerConfig, total: int, peak: float) -> list[float]:
    s = Schedule(cfg, total_steps=total, tokens_per_step=1000)
    return [peak * s(i) for i in range(total)]


def test_cosine_with_warmup_matches_torch():
    W, T, peak, af = 10, 100, 3e-4, 0.1
    ref = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-12, end_factor=1.0, total_iters=W),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T - W, eta_min=af * peak),
            ],
            milestones=[W],
        ),
        peak,
        T,
    )
    ours = _ours(SchedulerConfig(name="cosine", warmup="10ba", alpha_f=af), T, peak)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)


def test_linear_decay_with_warmup_in_tokens_matches_torch():
    W, T, peak, af = 5, 60, 1e-3, 0.0
    ref = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=1e-12, end_factor=1.0, total_iters=W),
                torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=1e-12, total_iters=T - W),
            ],
            milestones=[W],
        ),
        peak,
        T,
    )
    ours = _ours(
        SchedulerConfig(name="linear", warmup="5000tok", alpha_f=af), T, peak
    )  # 1000 tokens per step
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)


def test_constant_and_inverse_sqrt():
    peak = 1.0
    const = _ours(SchedulerConfig(name="constant", warmup="0.1dur"), 50, peak)
    assert const[:5] == [i / 5 for i in range(5)] and const[5:] == [1.0] * 45
    inv = _ours(SchedulerConfig(name="inverse_sqrt", warmup=4), 50, peak)
    assert inv == [i / 4 for i in range(4)] + [math.sqrt(4 / s) for s in range(4, 50)]


def test_durations():
    assert duration_steps("1e4tok", "x", tokens_per_step=3000) == 4
    assert (
        duration_steps("250ba", "x", tokens_per_step=1) == duration_steps(250, "x", tokens_per_step=1) == 250
    )
    assert duration_steps("0.25dur", "x", tokens_per_step=1, total_steps=40) == 10
    for bad in ("10 epochs", "-3ba", "x", True):
        with pytest.raises(ConfigError, match=r"duration|negative"):
            duration_steps(bad, "train.max_duration", tokens_per_step=1)


def test_lion_temporaries_stay_within_a_chunk(monkeypatch):
    """The update sign(β1·m + (1−β1)·g) is a new tensor list: it must cover at most CHUNK_ELEMENTS elements at a time
    (all of MPT-7B at once was a 26.6 GB temporary), and the chunked step still touches every parameter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.out_of_place: list[int] = []  # elements allocated by each out-of-place foreach lerp

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten._foreach_lerp:
                self.out_of_place.append(sum(t.numel() for t in out))
            return out

    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 2500)
    params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(10)]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(1000)
    opt = DecoupledLionW(params, lr=1e-2)
    with Sizes() as sizes:
        opt.step()
    assert sizes.out_of_place == [2000] * 5  # two 1000-element tensors per call: a third would pass 2500
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


def test_lion_steps_dtensor_shards_as_plain_tensors():
    """Under FSDP2 the parameters, gradients and momentum are DTensors. LION must not need DTensor sharding rules for
    its foreach ops (torch 2.11 has none for the out-of-place _foreach_lerp, and every multi-GPU run failed there):
    it steps the local shards, and the result equals the same step on plain tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class ForeachOnDTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x])]
            if "_foreach" in func.__name__ and any(isinstance(a, DTensor) for a in flat):
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        plain = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(6))]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        for p, s in zip(plain, sharded, strict=True):
            p.grad = torch.randn_like(p)
            s.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        ref = DecoupledLionW(plain, lr=1e-2, weight_decay=0.1)
        opt = DecoupledLionW(sharded, lr=1e-2, weight_decay=0.1)
        for _ in range(2):
            ref.step()
            with ForeachOnDTensor() as mode:
                opt.step()
            assert mode.seen == []
        for p, s in zip(plain, sharded, strict=True):
            assert isinstance(s, DTensor) and isinstance(
                opt.state[s]["exp_avg"], DTensor
            )  # DCP saves DTensors
            torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=0, atol=0)
            torch.testing.assert_close(opt.state[s]["exp_avg"].full_tensor(), ref.state[p]["exp_avg"])
    finally:
        if owned:
            dist.destroy_process_group()


def test_adamw_with_bf16_state_follows_torch_adamw():
    from smalto.train.adamw_bf16 import AdamWBf16State

    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 8)
    mine = torch.nn.Linear(16, 8)
    mine.load_state_dict(ref.state_dict())
    opts = [
        torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
        AdamWBf16State(mine.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    ]
    for _ in range(5):
        x = torch.randn(4, 16)
        for model, opt in zip((ref, mine), opts, strict=True):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    state = opts[1].state[mine.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # 5 steps move each weight up to 5e-2; bf16 moments (8 bits of mantissa) keep the result within 1% of that
    torch.testing.assert_close(mine.weight, ref.weight, atol=5e-4, rtol=0)
