"""`smalto finetune`: `finetune(spec, overrides)` reads a finetuning recipe and runs it on the training loop.

A finetuning recipe is a training recipe (same sections, same trainer: FSDP2, exact resume, guards, metrics) with:
    base_model: PATH       anything `smalto.load` reads; the model section defaults to its config, the tokenizer to
                           its own (or its run's), and checkpoint.load_from to it
    data:                  FinetuneDataConfig (smalto.data.finetune_stream): sources with a preprocessing step,
                           eval_fraction / eval_sources, packing, target rules
    finetune:              smalto.train.finetune.FinetuneSection: the export's chat template, sample generations
    lora:                  smalto.adapters.LoraConfig: when present, LoRA (or QLoRA with base_dtype nf4) on a
                           frozen base; checkpoints hold the adapters and the export is a PEFT adapter folder
The objective's parts that the loop calls (data streams, samples at evaluations, the export's chat files) are in
smalto/train/finetune.py; this module reads the recipe, runs the loop and reports.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smalto.adapters.lora import LoraConfig
from smalto.config import RunConfig, apply_overrides, find_recipe, read_recipe_file
from smalto.errors import ConfigError, build
from smalto.train.finetune import FinetuneSection, held_out_prompts, icl_scorer, sampler, write_chat_files

DEFAULT_RECIPE = "tiny-instruct"


@dataclass
class FinetuneResult:
    train: Any  # smalto.train.loop.TrainResult
    eval_before: float | None
    eval_after: float | None
    samples: list[tuple[str, str]] = field(
        default_factory=list
    )  # (held-out prompt, the exported model's answer)


def load_finetune_config(spec: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A finetuning recipe (path or shipped name; default tiny-instruct) with overrides, validated; the model
    section starts from the base model's config."""
    from smalto.data.finetune_stream import FinetuneDataConfig
    from smalto.load import base_tokenizer_path, model_config

    path = find_recipe(spec or DEFAULT_RECIPE)
    d = apply_overrides(read_recipe_file(path), overrides or [])
    base = d.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(
            "the recipe has no base_model: set it to an HF folder, a run folder or a checkpoint"
        )
    if d.get("prepare") == "stdlib-instruct":
        ensure_base_model(base)
    stored = model_config(base).to_dict()
    given = d.get("model") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"model must be a mapping, got {given!r}")
    attn = {**stored.get("attn_config", {}), **(given.get("attn_config") or {})}
    data: dict[str, Any] = d["data"] if isinstance(d.get("data"), dict) else {}
    if data.get("packing", True):  # packed examples must not attend to each other
        if (given.get("attn_config") or {}).get("attn_uses_sequence_id") is False:
            raise ConfigError(
                "data.packing needs model.attn_config.attn_uses_sequence_id (attention kept inside each example); "
                "remove the override or set data.packing=false"
            )
        attn["attn_uses_sequence_id"] = True
    d["model"] = {**stored, **given, "attn_config": attn}
    if not d.get("tokenizer"):
        d["tokenizer"] = base_tokenizer_path(base)
    ck = dict(d.get("checkpoint") or {})
    ck.setdefault("load_from", base)
    d["checkpoint"] = ck
    section = build(FinetuneSection, d.get("finetune"), "finetune")
    lora = build(LoraConfig, d["lora"], "lora") if "lora" in d else None  # a lora section turns LoRA on
    d = {k: v for k, v in d.items() if k not in ("base_model", "finetune", "lora")}
    return RunConfig.from_dict(
        d, data_cls=FinetuneDataConfig, extra={"base_model": base, "finetune": section, "lora": lora}
    )


def finetune(spec: str | None = None, overrides: list[str] | None = None) -> FinetuneResult:
    from smalto.train.loop import train

    cfg = load_finetune_config(spec, overrides)
    hooks = [h for h in (icl_scorer(cfg), sampler(cfg)) if h is not None]

    def on_eval(t: Any, metrics: dict[str, Any]) -> None:
        for hook in hooks:
            hook(t, metrics)

    result = train(cfg, on_eval=on_eval)
    samples: list[tuple[str, str]] = []
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 holds the export
    if result.hf_folder and result.stopped is None and main:
        write_chat_files(cfg, Path(result.hf_folder))
        samples = _final_samples(cfg, result.hf_folder)
    return FinetuneResult(
        train=result, eval_before=result.eval_before, eval_after=result.eval_loss, samples=samples
    )


def _final_samples(cfg: RunConfig, hf_folder: str) -> list[tuple[str, str]]:
    """Greedy answers of the exported model (with its chat template) to the first held-out instructions."""
    from smalto.data.finetune_stream import read_sources
    from smalto.generate import generate
    from smalto.load import load_model_and_tokenizer

    if cfg.finetune.samples == 0:
        return []
    model, tok = load_model_and_tokenizer(hf_folder, device="cpu" if cfg.train.device == "cpu" else None)
    _, held = read_sources(cfg.data, tok)
    prompts = held_out_prompts([d for _, d, _ in held], cfg.finetune.samples, tok)
    if not prompts:
        return []
    outs = generate(model, tok, prompts, max_new_tokens=cfg.finetune.sample_tokens, temperature=0.0)
    return [(p, o.text or "") for p, o in zip(prompts, outs, strict=True)]


def ensure_base_model(path: str) -> None:
    """The tiny-instruct demo's base: when `path` is the `tiny` pretraining recipe's export and holds no model yet,
    run that recipe first (as `smalto train` would)."""
    from rich.console import Console

    from smalto.config import load_config
    from smalto.train.checkpoint import find_checkpoint
    from smalto.train.loop import train

    p = Path(path)
    if (p / "config.json").is_file() or (p.is_dir() and find_checkpoint(p) is not None) or p.is_file():
        return  # a model (smalto.load says what is wrong with a broken one)
    tiny = load_config("tiny")
    if tiny.checkpoint.hf_export is None or p.resolve() != Path(tiny.checkpoint.hf_export).resolve():
        raise ConfigError(
            f"base_model {path} does not exist (only the tiny recipe's export is made on demand)"
        )
    Console(stderr=True).print(
        f"[bold]base model {path} is missing: running `smalto train` (recipe tiny) first"
    )
    result = train(tiny)
    if result.stopped is not None or not (p / "config.json").is_file():
        raise ConfigError(
            f"the tiny pretraining run stopped ({result.stopped}); run `smalto train` to finish it"
        )


def show(r: FinetuneResult, console: Any) -> None:
    """The closing lines: the held-out loss before and after, and the export's answers to held-out prompts."""

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f} (ppl {math.exp(min(x, 50)):.2f})"

    console.print(f"held-out loss before: {fmt(r.eval_before)}\nheld-out loss after:  {fmt(r.eval_after)}")
    for prompt, answer in r.samples:
        console.rule("held-out prompt → answer")
        console.print(prompt + answer, markup=False, highlight=False)
