"""A reward model as a Hugging Face folder: what transformers' `MptForSequenceClassification` loads natively.

    save_reward_model(model, path, tokenizer=..)  the backbone's tensors + `score.weight`, and a config.json with
                                                   architectures [MptForSequenceClassification], num_labels 1
                                                   (id2label), pad_token_id (the token rule of the score)
    load_reward_model(path, device=.., dtype=..)   → MPTForSequenceScore in eval mode
transformers scores a row at its rightmost token that is not `pad_token_id`, as `MPTForSequenceScore` does, so
both give the same number (tests/train/test_reward.py). A config the native class does not compute exactly
(smalto/hf/save.py: `native_incompatibilities`) is written as model_type `smalto_mpt`: smalto reads it, and
transformers refuses it rather than computing another model. LLaMA-family backbones are not written as reward
folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smalto.errors import CheckpointError, ConfigError
from smalto.hf.llama import llama_incompatibilities
from smalto.hf.load import iter_tensors, parse_device, parse_dtype, read_config, weight_files
from smalto.hf.save import REMOTE_FILES, _swap_into_place, save_pretrained
from smalto.model.heads import MPTForSequenceScore

ARCHITECTURE = "MptForSequenceClassification"


def save_reward_model(model: MPTForSequenceScore, path: str | Path, *, tokenizer: Any = None) -> Path:
    if not llama_incompatibilities(model.config):
        raise ConfigError(
            "a reward model on a LLaMA-family backbone has no Hugging Face folder form in smalto; use an MPT base"
        )
    if model.pad_token_id is None:
        raise ConfigError(
            "a reward model folder needs a pad_token_id (transformers picks the scored token by it)"
        )
    dest = Path(path)
    tmp = dest.parent / f".{dest.name}.reward-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer)  # type: ignore[arg-type]  # same config/state surface
        cfg = json.loads((tmp / "config.json").read_text())
        native = cfg["model_type"] == "mpt"
        cfg.pop("auto_map", None)
        cfg.update(
            architectures=[ARCHITECTURE],
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            pad_token_id=model.pad_token_id,
            problem_type="regression",
        )
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").unlink(missing_ok=True)  # a classifier generates nothing
        if native:
            for name in REMOTE_FILES:
                (tmp / name).unlink(missing_ok=True)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def is_reward_folder(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    try:
        return ARCHITECTURE in json.loads(f.read_text()).get("architectures", [])
    except (OSError, json.JSONDecodeError):
        return False


def load_reward_model(
    path: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> MPTForSequenceScore:
    folder = Path(path)
    if not is_reward_folder(folder):
        raise CheckpointError(
            f"{path} is not a reward model folder (config.json's architectures must name {ARCHITECTURE}; "
            "`smalto reward` writes one)"
        )
    config, raw = read_config(folder)
    target = parse_dtype(dtype) or parse_dtype(raw.get("torch_dtype") or raw.get("dtype")) or torch.float32
    dev = parse_device(device) if device is not None else torch.device("cpu")
    model = MPTForSequenceScore(config, raw.get("pad_token_id"), device="meta")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    unexpected = []
    for name, tensor in (pair for f in weight_files(folder) for pair in iter_tensors(f)):
        if name not in params or tuple(tensor.shape) != tuple(params[name].shape):
            unexpected.append(f"{name} {tuple(tensor.shape)}")
            continue
        module_name, _, attr = name.rpartition(".")
        setattr(modules[module_name], attr, nn.Parameter(tensor.to(device=dev, dtype=target)))
        del params[name]
    if params or unexpected:
        raise CheckpointError(
            f"{folder} does not match its config.json: missing {', '.join(list(params)[:5]) or 'none'}; "
            f"unexpected or misshapen {', '.join(unexpected[:5]) or 'none'}"
        )
    from smalto.kernels import apply_inference

    apply_inference(model)  # type: ignore[arg-type]  # sets plans on model.transformer
    return model.eval()
