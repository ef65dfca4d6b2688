"""`smalto reward`: train a reward model on preference pairs and write it as an HF folder.

    run_reward(spec, overrides) → RewardResult (held-out accuracy before / after, the folder)
The recipe (`RewardRecipe`; default tiny-reward): base_model (anything `smalto.load` reads; its backbone starts the
reward model, its unembedding is dropped), data (TRL prompt/chosen/rejected rows), reward (smalto.train.reward:
RewardSection), optimizer, scheduler, device, checkpoint. Output in the run folder: hf/
(`MptForSequenceClassification`, smalto/hf/reward.py), metrics.jsonl, the resolved recipe (recipe.yaml) and
checkpoints/ (smalto.train.resume: relaunching the command continues the run from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smalto.config import OptimizerConfig, SchedulerConfig
from smalto.errors import ConfigError, check_choice
from smalto.rlhf import CheckpointSection, show_stopped
from smalto.train.reward import RewardSection

DEFAULT_RECIPE = "tiny-reward"
# a resumed run refuses changes to what its checkpoint and pair order depend on, and warns about its schedule
FIXED = (
    "seed",
    "base_model",
    "tokenizer",
    "data.",
    "dtype",
    "reward.batch_size",
    "reward.max_length",
    "reward.eval_fraction",
    "optimizer.name",
)
SCHEDULE = ("reward.steps", "optimizer.lr", "scheduler.")


@dataclass(kw_only=True)
class PairData:
    path: str
    """Preference rows (TRL's prompt / chosen / rejected; strings or chat messages): a file or folder."""
    eval_path: str | None = None
    """Held-out rows; when absent, reward.eval_fraction of `path` is held out (seeded)."""


@dataclass(kw_only=True)
class RewardRecipe:
    name: str = "reward"
    run_dir: str = "runs/{name}"
    seed: int = 17
    prepare: str | None = None
    """`stdlib-pairs`: write the demo's pairs at data.path (and train the tiny base model) when absent."""
    base_model: str
    tokenizer: str | None = None
    data: PairData
    reward: RewardSection = field(default_factory=RewardSection)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-5))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(name="linear", alpha_f=0.0))
    device: str = "auto"
    dtype: str = "fp32"
    """The weights' dtype while training (on CUDA the forward runs under bf16 autocast) and in the folder."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.prepare is not None:
            check_choice("prepare", self.prepare, ("stdlib-pairs",))


@dataclass
class RewardResult:
    accuracy_before: float | None
    accuracy_after: float | None
    pairs: int
    held_out: int
    too_long: int
    folder: str | None  # None when this launch stopped before the last step
    steps: int = 0  # the steps done, in all launches
    stopped: str | None = None  # "SIGINT", "SIGTERM" or "stop_after": the checkpoint continues the run
    checkpoint: str | None = None


def run_reward(spec: str | None = None, overrides: list[str] | None = None) -> RewardResult:
    import torch
    import yaml

    from smalto.data.pairs import read_pairs
    from smalto.demo_rlhf import prepare_pairs
    from smalto.hf.reward import save_reward_model
    from smalto.load import load
    from smalto.model.heads import MPTForSequenceScore
    from smalto.rlhf import MetricsLog, base_tokenizer, cuda_train_plan, device_for, prepare_demo, read_recipe
    from smalto.train.durable import replace_durably
    from smalto.train.resume import RECIPE, RunCheckpoints
    from smalto.train.reward import train_reward

    r = read_recipe(RewardRecipe, spec or DEFAULT_RECIPE, overrides or [])
    dev = device_for(r.device)
    checkpoints = RunCheckpoints(r.checkpoint, r.run_dir, dev)
    recipe = dataclasses.asdict(r)
    checkpoints.check_relaunch(recipe, fixed=FIXED, schedule=SCHEDULE)  # before anything is built or written
    prepare_demo(r, "stdlib-pairs", prepare_pairs)
    tok, tok_path = base_tokenizer(r.base_model, r.tokenizer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ConfigError(f"tokenizer {tok_path} has neither a pad nor an EOS token; the score needs one")
    lm = load(r.base_model, device=dev, dtype=r.dtype)
    read = read_pairs(r.data.path, tok, max_length=min(r.reward.max_length, lm.config.max_seq_len))
    pairs = read.pairs
    if r.data.eval_path is not None:
        held = read_pairs(r.data.eval_path, tok, max_length=lm.config.max_seq_len).pairs
    else:
        order = list(range(len(pairs)))
        random.Random(r.seed).shuffle(order)
        n = round(len(pairs) * r.reward.eval_fraction)
        held, pairs = [pairs[i] for i in order[:n]], [pairs[i] for i in order[n:]]
    torch.manual_seed(r.seed)
    model = MPTForSequenceScore.from_causal_lm(lm, pad)
    # the longest rows: chosen and rejected of each pair in one batch
    cuda_train_plan(model, 2 * (r.reward.micro_batch_size or r.reward.batch_size), r.reward.max_length)
    out = Path(r.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    replace_durably(out / RECIPE, yaml.safe_dump(recipe, sort_keys=False))
    log = MetricsLog(r.run_dir, r.reward.steps, r.log_every, start=checkpoints.step)
    before = next((row.get("eval/accuracy") for row in log.rows if row["step"] == 0), None)
    done = {"step": checkpoints.step}

    def record(step: int, metrics: dict[str, Any]) -> None:
        nonlocal before
        if step == 0:
            before = metrics.get("eval/accuracy")
        done["step"] = step
        log(step, metrics)

    try:
        last, stopped = train_reward(
            model,
            pairs,
            held,
            r.reward,
            r.optimizer,
            r.scheduler,
            seed=r.seed,
            log=record,
            checkpoints=checkpoints,
        )
    finally:
        log.close()
    folder = None if stopped else save_reward_model(model.eval(), out / "hf", tokenizer=tok_path)
    return RewardResult(
        accuracy_before=before,
        accuracy_after=None if stopped else last.get("eval/accuracy"),
        pairs=len(pairs),
        held_out=len(held),
        too_long=read.too_long,
        folder=None if folder is None else str(folder),
        steps=done["step"],
        stopped=stopped,
        checkpoint=None if checkpoints.path is None else str(checkpoints.path),
    )


def show(r: RewardResult, console: Any) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    console.print(
        f"pairs: {r.pairs} training, {r.held_out} held out"
        + (f" ({r.too_long} too long, dropped)" if r.too_long else "")
    )
    if r.stopped:
        console.print(f"held-out accuracy before: {pct(r.accuracy_before)}")
        show_stopped(console, r.stopped, r.steps, r.checkpoint)
        return
    console.print(
        f"held-out accuracy before: {pct(r.accuracy_before)}\nheld-out accuracy after:  {pct(r.accuracy_after)}"
    )
    console.print(f"reward model: {r.folder}")
