"""`smalto dpo`: `dpo(spec, overrides)` reads a preference-tuning recipe and runs it on the training loop.

A DPO recipe is a finetuning recipe (same trainer: FSDP2, exact resume, guards, metrics; base_model, tokenizer and
checkpoint.load_from as `smalto finetune` sets them) with:
    data:   PreferenceDataConfig (smalto.data.preference_stream): sources of TRL-format pairs, max_length,
            max_prompt_length, max_completion_length, truncation_mode, eval_fraction / eval_sources
    dpo:    smalto.train.dpo.DPOSection: beta, loss_type, label_smoothing, precompute_ref_log_probs
The objective (loss, reference, step, evaluation) is smalto/train/dpo.py; this module reads the recipe, runs the
loop and reports. The reference is always the base model, so a resumed run compares against the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smalto.config import RunConfig, apply_overrides, find_recipe, read_recipe_file
from smalto.errors import ConfigError, build

DEFAULT_RECIPE = "tiny-dpo"


@dataclass
class DPOResult:
    train: Any  # smalto.train.loop.TrainResult
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    demo: Any = None  # smalto.demo_dpo.DemoReport for the embedded demo, else None


def load_dpo_config(spec: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A DPO recipe (path or shipped name; default tiny-dpo) with overrides, validated; the model section starts
    from the base model's config."""
    from smalto.data.preference_stream import PreferenceDataConfig
    from smalto.finetune import ensure_base_model
    from smalto.load import base_tokenizer_path, model_config
    from smalto.train.dpo import DPOSection

    path = find_recipe(spec or DEFAULT_RECIPE)
    d = apply_overrides(read_recipe_file(path), overrides or [])
    base = d.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(
            "the recipe has no base_model: set it to the SFT model (HF folder, run or checkpoint)"
        )
    if "finetune" in d:
        raise ConfigError(
            f"{path} has a finetune section, which is `smalto finetune`'s; DPO's settings go in dpo"
        )
    data = d.get("data")
    if isinstance(data, dict) and "seq_len" in data:
        raise ConfigError(
            "data.seq_len is not a DPO key: set data.max_length (prompt + completion tokens, TRL's)"
        )
    if d.get("prepare") == "stdlib-preferences":
        ensure_base_model(base)
    stored = model_config(base).to_dict()
    given = d.get("model") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"model must be a mapping, got {given!r}")
    d["model"] = {
        **stored,
        **given,
        "attn_config": {**stored.get("attn_config", {}), **(given.get("attn_config") or {})},
    }
    if not d.get("tokenizer"):
        d["tokenizer"] = base_tokenizer_path(base)
    d["checkpoint"] = {"load_from": base, **(d.get("checkpoint") or {})}
    # a converging DPO loss is near 0, where ordinary noise is a large ratio: the spike guard is off unless asked for
    d["guard"] = {"spike": "off", **(d.get("guard") or {})}
    extra: dict[str, Any] = {"base_model": base, "dpo": build(DPOSection, d.get("dpo"), "dpo")}
    if "lora" in d:  # LoRA on the policy; the reference is the same model with its adapters disabled
        extra["lora"] = lora_section(d["lora"])
    d = {k: v for k, v in d.items() if k not in extra}
    cfg = RunConfig.from_dict(d, data_cls=PreferenceDataConfig, extra=extra)
    if cfg.checkpoint.load_from != base:
        raise ConfigError(
            f"checkpoint.load_from ({cfg.checkpoint.load_from}) differs from base_model ({base}): the policy starts "
            "from the reference's weights; set base_model to the SFT model"
        )
    return cfg


def lora_section(section: Any) -> Any:
    """The recipe's lora section as smalto.adapters.lora.LoraConfig (LoRA / QLoRA keys as `smalto finetune`'s)."""
    try:
        from smalto.adapters.lora import LoraConfig  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError(
            "the recipe has a lora section, but this smalto has no LoRA (smalto.adapters.lora)"
        ) from None
    return build(LoraConfig, section, "lora")


def dpo(spec: str | None = None, overrides: list[str] | None = None) -> DPOResult:
    from smalto.train.dpo import DPO
    from smalto.train.loop import train

    cfg = load_dpo_config(spec, overrides)
    demo = None
    if cfg.prepare == "stdlib-preferences":
        from smalto.demo_dpo import measure

        demo = measure(cfg, str(cfg.base_model))  # the property's rate before
    evals: dict[int, dict[str, float]] = {}

    def keep(t: Any, metrics: dict[str, Any]) -> None:
        evals[t.step] = {k: v for k, v in metrics.items() if k.startswith("eval/")}

    result = train(cfg, on_eval=keep, objective=DPO(cfg.dpo))
    if demo is not None and result.hf_folder and result.stopped is None:
        from smalto.demo_dpo import measure

        demo = measure(cfg, result.hf_folder, before=demo)
    return DPOResult(
        train=result,
        eval_before=evals.get(0, {}),
        eval_after=evals[max(evals)] if evals and max(evals) > 0 else {},
        demo=demo,
    )


def show(r: DPOResult, console: Any) -> None:
    """The closing lines: the held-out loss and reward accuracy and margin before and after, and the demo's
    property on held-out prompts."""
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        if key in r.eval_before or key in r.eval_after:
            b, a = r.eval_before.get(key), r.eval_after.get(key)
            fmt = lambda x: "-" if x is None else f"{x:.4f}"
            console.print(f"held-out {key[5:]}: {fmt(b)} before → {fmt(a)} after", highlight=False)
    if r.demo is not None:
        from smalto.demo_dpo import show_report

        show_report(r.demo, console)
