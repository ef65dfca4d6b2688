"""Where the model runs: process group, device, and one function that parallelises the model from outside.

`build_model` builds MPT on the meta device (no memory), applies, in this order,
  1. kernels: the attention plans (smalto/kernels/plans.py), the loss from the hidden states (chunked or full
     logits), the polynomial GELU (bf16), the once-per-step bf16 weight cast (one device): they change what modules compute, so everything after must see them;
  1b. adapters (LoRA, smalto/adapters): freeze the base and add trainable pairs to the targeted linears; the
     frozen base is stored in bf16 on one device with bf16 (FSDP2 keeps one dtype per unit and casts at gathering);
  2. activation checkpointing (every block, every k-th, or selective: every block keeping attention's outputs;
     smalto/train/checkpointing.py): wraps blocks, so it must see the plain blocks;
  3. torch.compile per block: compiles the (possibly checkpoint-wrapped) block, so recomputation is compiled too;
  4. FSDP2 `fully_shard` per block, then the root (which keeps the tied embedding/unembedding in one unit):
     it must come last, because it wraps what the others produced;
then materialises only this rank's shards (`to_empty`) and initialises them. World size 1 runs the same code
with step 4 left out (there is nothing to shard; bf16 comes from autocast instead of FSDP's policy).

Initialisation is identical for every world size: each unit (embedding, each block, final norm) is initialised
in full, one at a time, from its own seed, and each rank keeps its slice. That costs one block of memory and
makes a 1-process and an N-process run start from the same weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from smalto.adapters.lora import LoraConfig, adapters, apply_lora
from smalto.errors import ConfigError
from smalto.kernels import apply
from smalto.kernels.gelu import use_poly_gelu
from smalto.model.attention import AttentionPlan
from smalto.model.config import MPTConfig
from smalto.model.init import init_weights
from smalto.model.mpt import HeadLoss, MPTForCausalLM
from smalto.train.checkpointing import checkpoint_blocks
from smalto.train.weight_cast import use_step_cast


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any = None  # DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_world(device: str = "auto") -> World:
    """Join the torchrun process group when launched by torchrun; otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = cuda but no CUDA device is visible; use train.device=cpu")
        dev = torch.device("cuda", local_rank if device == "cuda" else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    w = World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
            )
        w.mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("dp",))
    return w


def close_world(world: World) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def build_model(
    config: MPTConfig,
    world: World,
    *,
    seed: int,
    plans: dict[str, AttentionPlan] | None = None,
    head_loss: HeadLoss | None = None,
    step_cast: bool = False,
    activation_checkpointing: bool | int | str = False,
    compile: bool = False,
    bf16: bool = False,
    reshard_after_forward: bool = True,
    lora: LoraConfig | None = None,
) -> MPTForCausalLM:
    model = MPTForCausalLM(config, device="meta")
    parallelize(
        model,
        world,
        plans=plans,
        head_loss=head_loss,
        step_cast=step_cast,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
        bf16=bf16,
        reshard_after_forward=reshard_after_forward,
        lora=lora,
    )
    model.to_empty(device=world.device)
    materialize(model, config, world, seed=seed)
    if lora is not None:
        init_adapters(model, world, seed=seed)
    return model


def parallelize(
    model: MPTForCausalLM,
    world: World,
    *,
    plans: dict[str, AttentionPlan] | None = None,
    head_loss: HeadLoss | None = None,
    step_cast: bool = False,
    activation_checkpointing: bool | int | str = False,
    compile: bool = False,
    bf16: bool = False,
    reshard_after_forward: bool = True,
    lora: LoraConfig | None = None,
) -> None:
    blocks = model.transformer.blocks
    # 1. kernels: what the modules compute (before anything wraps or compiles them)
    if plans:
        apply(model, plans)
    if head_loss is not None:
        model.head_loss = head_loss
    if bf16:
        use_poly_gelu(model)
    if step_cast:
        use_step_cast(blocks)
    # 1b. adapters: a frozen base (no weight-gradient products) and trainable float32 LoRA pairs
    if lora is not None:
        apply_lora(model, lora)
        if bf16 and world.world_size == 1:
            frozen_to(model, torch.bfloat16)
    # 2. activation checkpointing: recompute a block's activations in the backward instead of keeping them
    #    (selective: all but attention's outputs)
    if activation_checkpointing:
        dropout = model.config.resid_pdrop > 0 or model.config.attn_config.attn_pdrop > 0
        dropout = dropout or (lora is not None and lora.dropout > 0)
        checkpoint_blocks(blocks, activation_checkpointing, preserve_rng_state=dropout)
    # 3. per-block compile: every block has the same code, so one graph serves all of them
    if compile:
        for block in blocks:
            block.compile()
    # 4. FSDP2: one unit per block; the root holds the embedding (tied to the unembedding), final norm and head
    if world.world_size > 1:
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for i, block in enumerate(blocks):
            # the last block's parameters are needed again at once by the backward: keep them gathered
            last = i == len(blocks) - 1
            fully_shard(
                block, mesh=world.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last
            )
        fully_shard(model, mesh=world.mesh, mp_policy=mp, reshard_after_forward=False)


def frozen_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen floating-point parameters in `dtype` (those on the meta device, before materialising: a
    base built from its weights, as QLoRA's, keeps the dtype it was loaded in)."""
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta and not p.requires_grad and p.is_floating_point():
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)


@torch.no_grad()
def init_adapters(model: nn.Module, world: World, *, seed: int) -> None:
    """Initialise every LoRA pair (A Kaiming-uniform, B zero) from its own seed, in full, keeping this rank's
    shard: the same start for every world size."""
    devices = [world.device] if world.device.type == "cuda" else []
    for k, a in enumerate(adapters(model)):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1_000_003 + 999_983 + k)
            full_a = torch.empty(a.lora_A.weight.shape, device=world.device)
            full_b = torch.zeros(a.lora_B.weight.shape, device=world.device)
            nn.init.kaiming_uniform_(full_a, a=5**0.5)
        _copy_shard(a.lora_A.weight, full_a, world)
        _copy_shard(a.lora_B.weight, full_b, world)


def clean_name(name: str) -> str:
    """A parameter's checkpoint name, without the wrappers' prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


@torch.no_grad()
def materialize(model: nn.Module, config: MPTConfig, world: World, *, seed: int) -> None:
    """Initialise this rank's shards exactly as a single-device model with the same seed would be."""
    params = {clean_name(n): p for n, p in model.named_parameters()}
    ref = MPTForCausalLM(config, device="meta")  # the unsharded layout, one unit materialised at a time
    units = [(n, m) for n, m in ref.transformer.named_children() if n != "blocks"]
    units = [(f"transformer.{n}", m) for n, m in units]
    units += [(f"transformer.blocks.{i}", b) for i, b in enumerate(ref.transformer.blocks)]
    if hasattr(ref, "lm_head"):
        units.append(("lm_head", ref.lm_head))
    devices = [world.device] if world.device.type == "cuda" else []
    for k, (prefix, unit) in enumerate(units):
        if not any(True for _ in unit.parameters()):
            continue
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1_000_003 + k)
            unit.to_empty(device=world.device)
            init_weights(unit, config)
        for n, full in unit.named_parameters():
            _copy_shard(params[f"{prefix}.{n}"], full, world)
        unit.to_empty(device="meta")


def _copy_shard(target: torch.Tensor, full: torch.Tensor, world: World) -> None:
    if isinstance(target, DTensor):
        local = target.to_local()
        chunks = torch.chunk(full, world.world_size, dim=0)  # FSDP2 shards dim 0 as torch.chunk does
        part = chunks[world.rank] if world.rank < len(chunks) else full[:0]
        assert part.shape == local.shape, (part.shape, local.shape)
        local.copy_(part)
    else:
        target.copy_(full)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict in CPU memory (on rank 0; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd: dict[str, Any] = get_model_state_dict(model, options=opts)
    return {clean_name(k): v for k, v in sd.items()}
