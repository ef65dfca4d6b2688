"""optimizer.offload = cpu: the state lives in CPU memory and the updates are the wrapped optimizer's, bit for bit;
a run with it gives the same losses as one without, across a checkpoint and resume."""

from __future__ import annotations

import pytest
import torch

from smalto.config import OptimizerConfig
from smalto.errors import ConfigError
from smalto.train.offload import OffloadedState
from smalto.train.optim import build_optimizer
from tests.train.conftest import losses, recipe


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


@pytest.mark.parametrize(
    "opt",
    [
        {"name": "adamw", "weight_decay": 0.1},
        {"name": "adamw", "state_dtype": "bf16", "weight_decay": 0.1},
        {"name": "lion", "weight_decay": 1e-3},
    ],
    ids=["adamw", "adamw-bf16", "lion"],
)
def test_offloaded_steps_equal_the_wrapped_optimizer(opt):
    ref, mine = _model(), _model()
    plain = build_optimizer(ref, OptimizerConfig(lr=1e-2, **opt))
    offloaded = build_optimizer(mine, OptimizerConfig(lr=1e-2, offload="cpu", **opt))
    assert isinstance(offloaded, OffloadedState)
    offloaded.chunk_elements = 300  # several chunks: 16·32 weights alone, biases and the last layer together
    assert [len(c) for c in offloaded.chunks()] == []  # no gradients yet: nothing to step
    for step in range(4):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        for model, o in ((ref, plain), (mine, offloaded)):
            model(x).square().sum().backward()
            for g in o.param_groups:
                g["lr"] = 1e-2 * (step + 1) / 4  # a schedule writes the shared groups
            o.step()
            o.zero_grad(set_to_none=True)
        if step == 0:
            mine[0].weight.grad = torch.zeros_like(mine[0].weight)
            assert [len(c) for c in offloaded.chunks()] == [1]
            mine[0].weight.grad = None
    for a, b in zip(ref.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
        for k, v in plain.state[p].items():
            torch.testing.assert_close(offloaded.state[q][k], v, rtol=0, atol=0)
    # a state_dict round trip keeps the state in CPU memory, as a new optimizer loads it
    again = build_optimizer(mine, OptimizerConfig(lr=1e-2, offload="cpu", **opt))
    again.load_state_dict(offloaded.state_dict())
    assert all(
        v.device.type == "cpu" for st in again.state.values() for v in st.values() if torch.is_tensor(v)
    )
    assert set(again.state) == set(mine.parameters())


def test_offload_is_refused_under_fsdp(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _model()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ConfigError, match=r"optimizer.offload = cpu is for one process"):
            build_optimizer(model, OptimizerConfig(name="adamw", offload="cpu"))
    finally:
        if owned:
            dist.destroy_process_group()


def test_host_arena_carves_aligned_tensors_from_slabs(monkeypatch):
    from smalto.train.offload import HostArena

    monkeypatch.setattr(HostArena, "SLAB_BYTES", 4096)
    arena = HostArena(pin=False)
    a, b = arena.empty((10, 10), torch.float32), arena.empty((3,), torch.bfloat16)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one slab
    assert b.data_ptr() - a.data_ptr() == 512  # 400 bytes, aligned up
    c = arena.empty((1000,), torch.float32)  # does not fit the rest of the slab: a new one, from its start
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert c.data_ptr() == c.untyped_storage().data_ptr()
    big = arena.empty((2000,), torch.float32)  # larger than a slab: alone
    assert big.untyped_storage().nbytes() == 8000
    a.fill_(1.0), b.fill_(2.0), c.fill_(3.0)
    assert a.sum() == 100 and b.float().sum() == 6 and c.sum() == 3000  # no overlap


def test_offload_choice_is_checked():
    with pytest.raises(ConfigError, match=r"optimizer.offload.*'gpu'.*none.*cpu"):
        OptimizerConfig(offload="gpu")


def test_training_with_offload_equals_training_without(tiny_data, tmp_path):
    """The same 8 steps of AdamW with and without offload (the offloaded run stopped after 3 steps and resumed
    from its DCP checkpoint): the same losses, bit for bit."""
    import copy

    from smalto.config import RunConfig
    from smalto.train.loop import train

    adamw = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01}
    rec = recipe(tiny_data, tmp_path / "plain", optimizer=adamw)
    rec["train"]["eval_batches"] = 0
    train(RunConfig.from_dict(copy.deepcopy(rec)))
    rec["run_dir"], rec["optimizer"]["offload"] = str(tmp_path / "offload"), "cpu"
    first = train(RunConfig.from_dict({**copy.deepcopy(rec), "train": {**rec["train"], "stop_after": 3}}))
    assert first.checkpoint is not None and first.checkpoint.endswith("step_00000003")
    train(RunConfig.from_dict(copy.deepcopy(rec)))
    assert len(losses(tmp_path / "plain")) == 8
    assert losses(tmp_path / "offload") == losses(tmp_path / "plain")
    # the state lives in shared CPU slabs (HostArena); a checkpoint still holds each tensor alone, not its slab
    size = {
        run: sum(
            f.stat().st_size for f in (tmp_path / run / "checkpoints" / "step_00000008").rglob("*.distcp")
        )
        for run in ("plain", "offload")
    }
    assert size["offload"] < 1.05 * size["plain"], size


def test_the_state_kept_between_steps_is_the_host_copy_not_the_tensors_the_step_made():
    """From the first step on, what the optimizer keeps is its own CPU copy (carved from its host arena), never the
    tensors the wrapped optimizer created or updated, which on a GPU live in GPU memory."""
    model = _model()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2, offload="cpu"))
    made: list[int] = []
    inner_step = opt.inner.step

    def step_and_record(*a, **k):
        out = inner_step(*a, **k)
        made.extend(v.data_ptr() for st in opt.state.values() for v in st.values() if v.dim() > 0)
        return out

    opt.inner.step = step_and_record
    slab = opt._arena
    for _ in range(2):
        model(torch.randn(4, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert slab.slab is not None
        lo = slab.slab.data_ptr()
        kept = [v for st in opt.state.values() for v in st.values() if v.dim() > 0]
        assert kept and all(lo <= v.data_ptr() < lo + slab.SLAB_BYTES for v in kept)
        assert not {v.data_ptr() for v in kept} & set(made)
