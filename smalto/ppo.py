"""`smalto ppo`: optimise a policy against a reward with PPO (a KL penalty to the frozen starting model).

    run_ppo(spec, overrides) → PPOResult (held-out score before / after, the exported policy)
The recipe (`PPORecipe`; default tiny-ppo): base_model (the SFT model: the policy starts from it and the reference
is it, frozen), data (prompt rows), reward (a `smalto reward` folder, or a rule: smalto/train/scorers.py), ppo
(smalto.train.ppo.PPOSection), optimizer, device, lora. Each step: sample `batch_size` responses (the generation
share of the step), score them, compute the reference log-probabilities, rewards and advantages, then update
(the training share). The policy and the critic share one backbone (a value head on the policy's final hidden
states, as TRL's AutoModelForCausalLMWithValueHead). Output in the run folder: hf/ (the policy, an HF folder),
metrics.jsonl, recipe.yaml, checkpoints/ (smalto.train.resume: relaunching the command continues the run).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smalto.config import OptimizerConfig
from smalto.errors import ConfigError, build, check_choice
from smalto.rlhf import CheckpointSection, show_stopped
from smalto.train.ppo import PPOSection

DEFAULT_RECIPE = "tiny-ppo"
# a resumed run refuses changes to what its checkpoint and prompt order depend on, and warns about its schedule
FIXED = ("seed", "base_model", "tokenizer", "data.", "dtype", "lora", "ppo.batch_size", "optimizer.name")
SCHEDULE = ("ppo.steps", "optimizer.lr")


@dataclass(kw_only=True)
class PromptData:
    path: str
    """Rows with a `prompt`: a string, or chat messages (rendered with the chat template, generation prompt on)."""
    eval_path: str | None = None
    eval_prompts: int = 64
    """Held-out prompts whose mean score is measured before and after (from eval_path, else held out of path)."""
    max_prompt_tokens: int = 192
    """Longer prompts are dropped and counted."""


@dataclass(kw_only=True)
class RewardSource:
    model: str | None = None
    """A reward model folder (`smalto reward` writes one); it must share the policy's tokenizer."""
    rule: str | None = None
    """Instead of a model: contains:TEXT, ends_with:TEXT or valid_python."""

    def __post_init__(self) -> None:
        if (self.model is None) == (self.rule is None):
            raise ConfigError(
                "reward needs exactly one of reward.model (a reward model folder) or reward.rule"
            )


@dataclass(kw_only=True)
class PPORecipe:
    name: str = "ppo"
    run_dir: str = "runs/{name}"
    seed: int = 17
    prepare: str | None = None
    """`stdlib-prompts`: write the demo's prompts at data.path (and train the tiny base model) when absent."""
    base_model: str
    tokenizer: str | None = None
    data: PromptData
    reward: RewardSource
    ppo: PPOSection = field(default_factory=PPOSection)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-6))
    device: str = "auto"
    dtype: str = "fp32"
    """The policy's weights while training (CUDA runs the forwards under bf16 autocast) and in the export."""
    lora: dict[str, Any] | None = None
    """LoRA settings: the policy and critic train adapters on one frozen base, the reference is the base with the
    adapters switched off (smalto.adapters.lora)."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.prepare is not None:
            check_choice("prepare", self.prepare, ("stdlib-prompts",))


@dataclass
class PPOResult:
    score_before: float | None
    score_after: float | None  # None when this launch stopped before the last step
    steps: int  # the steps done, in all launches
    generation_share: float  # of this launch's steps' time, summed over steps
    folder: str | None
    samples: list[tuple[str, str]] = field(default_factory=list)
    stopped: str | None = None  # "SIGINT", "SIGTERM" or "stop_after": the checkpoint continues the run
    checkpoint: str | None = None


def run_ppo(spec: str | None = None, overrides: list[str] | None = None) -> PPOResult:
    import torch
    import yaml

    from smalto.demo_rlhf import prepare_prompts
    from smalto.hf.save import save_pretrained
    from smalto.load import load
    from smalto.model.heads import MPTWithValueHead
    from smalto.rlhf import MetricsLog, base_tokenizer, cuda_train_plan, device_for, prepare_demo, read_recipe
    from smalto.train.durable import replace_durably
    from smalto.train.optim import build_optimizer
    from smalto.train.ppo_trainer import PPOTrainer
    from smalto.train.resume import RECIPE, RunCheckpoints

    r = read_recipe(PPORecipe, spec or DEFAULT_RECIPE, overrides or [])
    dev = device_for(r.device)
    checkpoints = RunCheckpoints(r.checkpoint, r.run_dir, dev, trainable_only=r.lora is not None)
    recipe = dataclasses.asdict(r)
    checkpoints.check_relaunch(recipe, fixed=FIXED, schedule=SCHEDULE)  # before anything is built or written
    prepare_demo(r, "stdlib-prompts", prepare_prompts)
    tok, tok_path = base_tokenizer(r.base_model, r.tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    torch.manual_seed(r.seed)
    policy = load(r.base_model, device=dev, dtype=r.dtype)
    c = policy.config
    if r.data.max_prompt_tokens + r.ppo.max_new_tokens > c.max_seq_len:
        raise ConfigError(
            f"data.max_prompt_tokens ({r.data.max_prompt_tokens}) + ppo.max_new_tokens ({r.ppo.max_new_tokens}) "
            f"exceeds the model's max_seq_len ({c.max_seq_len})"
        )
    train_prompts, held = _prompts(r, tok)
    reference, ref_model = _reference(r, policy)
    for m in policy.modules():  # PPO's log-probabilities must be those the rollout sampled from
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = MPTWithValueHead(policy)
    cuda_train_plan(policy, r.ppo.mini_batch_size, c.max_seq_len)
    trainer = PPOTrainer(
        model,
        reference,
        ref_model,
        _scorer(r, dev, c.vocab_size, tok),
        build_optimizer(model, r.optimizer),
        r.ppo,
        pad_id=pad,
        eos_id=tok.eos_token_id,
        seed=r.seed,
    )
    state = checkpoints.resume(model, trainer.optimizer)
    if state is not None:
        trainer.load_state_dict(state)
    start = min(checkpoints.step, r.ppo.steps)
    out = Path(r.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    replace_durably(out / RECIPE, yaml.safe_dump(recipe, sort_keys=False))
    log = MetricsLog(r.run_dir, r.ppo.steps, r.log_every, start=start)
    before = next((row["eval/score"] for row in log.rows if row["step"] == 0 and "eval/score" in row), None)
    if start == 0:
        before, _ = trainer.evaluate(held, r.seed + 1)
        log(0, {"eval/score": before})
    order = random.Random(r.seed)
    for _ in range(start):  # the prompts the checkpoint's steps drew
        order.sample(train_prompts, r.ppo.batch_size)
    end = r.ppo.steps if r.ppo.stop_after is None else min(r.ppo.steps, start + r.ppo.stop_after)
    gen_s = total_s = 0.0
    step, stopped = start, None
    try:
        with checkpoints.signals:
            for step in range(start + 1, end + 1):
                stats = trainer.step(order.sample(train_prompts, r.ppo.batch_size), seed=r.seed * 1000 + step)
                gen_s, total_s = gen_s + stats["time/generation_s"], total_s + stats["time/step_s"]
                log(step, stats)
                stopped = checkpoints.end_of_step(
                    step, r.ppo.steps, end, model, trainer.optimizer, trainer.state_dict()
                )
                if stopped:
                    break
        if stopped is None:
            after, responses = trainer.evaluate(held, r.seed + 1)
            if start < r.ppo.steps:  # a finished run relaunched has its evaluation logged already
                log(r.ppo.steps, {"eval/score": after})
    finally:
        log.close()
    result = PPOResult(
        score_before=before,
        score_after=None,
        steps=step,
        generation_share=gen_s / max(total_s, 1e-9),
        folder=None,
        stopped=stopped,
        checkpoint=None if checkpoints.path is None else str(checkpoints.path),
    )
    if stopped is not None:
        return result
    if r.lora is None:
        folder = save_pretrained(policy, out / "hf", tokenizer=tok_path)
    else:  # the adapters alone, in PEFT's format, beside the tokenizer (as `smalto finetune` with lora)
        from smalto.adapters.lora import LoraConfig
        from smalto.adapters.peft import save_adapter
        from smalto.hf.save import write_tokenizer

        folder = out / "hf"
        save_adapter(policy, folder, build(LoraConfig, r.lora, "lora"), base=str(r.base_model))
        write_tokenizer(tok_path, folder)
    result.score_after, result.folder = after, str(folder)
    result.samples = [(tok.decode(p), tok.decode(a)) for p, a in list(zip(held, responses, strict=True))[:3]]
    return result


def _prompts(r: PPORecipe, tok: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, held-out prompts) as token ids."""
    from smalto.data.pairs import read_prompts

    prompts = read_prompts(r.data.path, tok, max_tokens=r.data.max_prompt_tokens)
    if r.data.eval_path is not None:
        return prompts, read_prompts(r.data.eval_path, tok, max_tokens=r.data.max_prompt_tokens)[
            : r.data.eval_prompts
        ]
    random.Random(r.seed).shuffle(prompts)
    held, train = prompts[: r.data.eval_prompts], prompts[r.data.eval_prompts :]
    if len(train) < r.ppo.batch_size:
        raise ConfigError(
            f"{len(train)} training prompts after holding out data.eval_prompts ({r.data.eval_prompts}); "
            f"ppo.batch_size needs {r.ppo.batch_size}"
        )
    return train, held


def _reference(r: PPORecipe, policy: Any) -> tuple[Any, Any]:
    """(context for reference forwards, the model that computes them). Without LoRA: a frozen copy of the starting
    policy. With LoRA: the policy itself with its adapters switched off, so the base weights exist once.

    The value head is added after this, so it trains beside the adapters."""
    if r.lora is None:
        ref = copy.deepcopy(policy).eval()
        ref.requires_grad_(False)
        return nullcontext, ref
    from smalto.adapters.lora import LoraConfig, adapters_disabled, apply_lora

    apply_lora(policy, build(LoraConfig, r.lora, "lora"))
    return (lambda: adapters_disabled(policy)), policy


def _scorer(r: PPORecipe, dev: Any, vocab_size: int, tok: Any) -> Any:
    """fn(prompt ids, response ids) → scores (B,) on the CPU or the device."""
    from smalto.train.scorers import ModelScorer, rule_scorer

    if r.reward.model is not None:
        rm = ModelScorer(r.reward.model, dev, None, vocab_size)
        return lambda prompts, responses: rm([p + x for p, x in zip(prompts, responses, strict=True)])
    assert r.reward.rule is not None
    rule = rule_scorer(r.reward.rule)
    return lambda prompts, responses: rule(
        [tok.decode(p) for p in prompts], [tok.decode(x, skip_special_tokens=True) for x in responses]
    )


def show(r: PPOResult, console: Any) -> None:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    if r.stopped:
        console.print(f"held-out score before: {num(r.score_before)}")
        show_stopped(console, r.stopped, r.steps, r.checkpoint)
        return
    console.print(
        f"held-out score before: {num(r.score_before)}\nheld-out score after:  {num(r.score_after)}"
    )
    console.print(f"generation share of the steps' time: {100 * r.generation_share:.0f}%")
    for p, a in r.samples:
        console.rule("held-out prompt → response")
        console.print(p + a, markup=False, highlight=False)
    console.print(f"policy: {r.folder}")
