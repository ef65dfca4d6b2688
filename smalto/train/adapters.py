"""LoRA in the trainer: the QLoRA model (NF4 base, built from its weights rather than on the meta device) and the
export of a LoRA run, PEFT's adapter folder with the tokenizer.

A LoRA run is a finetuning run with a `lora` section: `parallelize` adds the adapters (smalto/train/parallel.py),
the optimizer sees only the trainable tensors, and checkpoints hold those and their optimizer state
(`Checkpointer(trainable_only=True)`); what changes at the end is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from smalto.errors import ConfigError
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from smalto.train.parallel import World, clean_name, parallelize


def build_qlora_model(
    config: MPTConfig, world: World, *, seed: int, base: str | None, lora: Any, **options: Any
) -> MPTForCausalLM:
    """QLoRA: the base loaded in bf16 on the CPU, its block linears stored in NF4 (smalto.adapters.nf4), moved to
    the device, then adapters, activation checkpointing and compile as `parallelize` applies them. One device:
    an NF4 base is not sharded. The model's `base_loaded` tells setup that the base weights are in."""
    try:
        from smalto.adapters.nf4 import apply_nf4  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError(
            "lora.base_dtype = nf4 needs smalto.adapters.nf4, which this installation lacks; use lora.base_dtype=bf16"
        ) from None
    if world.world_size > 1:
        raise ConfigError(
            "lora.base_dtype = nf4 runs on one device (the NF4 base is not sharded); launch one process, or use "
            "lora.base_dtype=bf16 under torchrun"
        )
    import smalto
    from smalto.train.parallel import init_adapters

    assert base is not None  # a finetuning recipe has its base_model
    model = smalto.load(
        base, dtype="bf16", max_seq_len=config.max_seq_len, attn_config=config.to_dict()["attn_config"]
    )
    model.train()
    apply_nf4(model, double_quant=True)
    model.to(world.device)
    parallelize(model, world, lora=lora, **options)
    init_adapters(model, world, seed=seed)
    model.base_loaded = True  # type: ignore[assignment]
    return model


def export_adapter(model: nn.Module, folder: str | Path, world: World, cfg: Any) -> None:
    """PEFT's adapter folder of the run (rank 0 writes; every rank takes part in gathering the adapters), with
    the tokenizer so that `smalto chat FOLDER` and `PeftModel.from_pretrained` find everything they need."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from smalto.adapters.peft import peft_state, save_adapter
    from smalto.hf.save import write_tokenizer

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state: dict[str, Any] = get_model_state_dict(model, options=opts)  # a collective
    if not world.is_main:
        return
    tensors = peft_state(model, {clean_name(k): v for k, v in state.items()}, cfg.lora.modules_to_save)
    save_adapter(model, folder, cfg.lora, base=cfg.base_model, state=tensors)
    if cfg.tokenizer:
        write_tokenizer(cfg.tokenizer, Path(folder))
