"""The run recipe: keyword-only dataclasses for every section, YAML loading, `a.b=c` overrides, cross-checks.

A recipe is a YAML mapping with the sections below; every key is checked (an unknown one is named with the keys
allowed there) and every value is validated before anything starts. Durations are integers (optimizer steps) or
strings with a unit, as llm-foundry writes them: "100ba" (steps), "1e9tok" (tokens), and for scheduler lengths
also "0.1dur" (a fraction of the whole run); `smalto finetune`'s max_duration may be in epochs ("2ep"). Paths may contain `{run_dir}`.

    name: my-run              # run folder defaults to runs/<name>
    model: {...}              # MPTConfig (smalto.model.config), HF mpt names
    data: {...}               # smalto.data.stream.DataConfig (sources, shuffle, ...)
    tokenizer: path           # saved next to the HF export; used for samples
    optimizer / scheduler / train / checkpoint / logging / guard: see the classes below

Why one file of this size: every section of a recipe is a small dataclass whose field docstrings are the user's
reference, and the cross-checks between sections (batch sizes, durations, paths) need all of them in one place.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smalto.errors import ConfigError, build, check_choice, check_keys, check_type
from smalto.model.config import MPTConfig

CONFIG_DIR = Path(__file__).parent / "configs"
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ba|tok|dur|ep)\s*$", re.IGNORECASE)


def fill(key: str, template: str, **values: str) -> str:
    """`template` with its `{placeholders}` filled in; refuses one not in `values`, naming the key."""
    try:
        return template.format(**values)
    except KeyError as e:
        problem = f"an unknown placeholder {{{e.args[0]}}}"
    except (IndexError, ValueError, AttributeError) as e:
        problem = f"a bad placeholder ({e})"
    allowed = ", ".join("{" + v + "}" for v in values)
    raise ConfigError(
        f"{key} = {template!r} has {problem}; allowed: {allowed} (write {{{{ and }}}} for braces)"
    )


# ---- durations ----


def parse_duration(value: int | float | str, key: str) -> tuple[float, str]:
    """(amount, unit) with unit 'ba', 'tok' or 'dur'; a bare number means optimizer steps."""
    if isinstance(value, bool):
        raise ConfigError(
            f"{key} = {value!r} is not a duration; write e.g. 1000, '1000ba', '2e9tok' or '0.1dur'"
        )
    if isinstance(value, int | float):
        amount, unit = float(value), "ba"
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(
                f"{key} = {value!r} is not a duration; write e.g. 1000, '1000ba', '2e9tok' or '0.1dur'"
            )
        amount, unit = float(m.group(1)), m.group(2).lower()
    if amount < 0:
        raise ConfigError(f"{key} = {value!r} must not be negative")
    return amount, unit


def duration_steps(
    value: int | float | str, key: str, *, tokens_per_step: int, total_steps: int | None = None
) -> int:
    """A duration in optimizer steps (tokens round up to whole steps; 'dur' is a fraction of total_steps)."""
    amount, unit = parse_duration(value, key)
    if unit == "ba":
        return math.ceil(amount)
    if unit == "tok":
        return math.ceil(amount / tokens_per_step)
    if unit == "ep":  # smalto finetune turns epochs into steps once its data is read (train/finetune.py)
        raise ConfigError(f"{key} = {value!r}: epochs ('ep') are for train.max_duration of `smalto finetune`")
    if total_steps is None:
        raise ConfigError(f"{key} = {value!r}: 'dur' (a fraction of the run) is only for scheduler lengths")
    return round(amount * total_steps)


def parse_seconds(value: str | int | float, key: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(value))
    if not m:
        raise ConfigError(f"{key} = {value!r} is not a time; write e.g. 90s, 2m or 1.5h")
    return float(m.group(1)) * {"s": 1, "m": 60, "min": 60, "h": 3600, None: 1}[m.group(2)]


# ---- sections ----


@dataclass(kw_only=True)
class OptimizerConfig:
    name: str = "lion"
    """`lion` (llm-foundry's DecoupledLionW) or `adamw` (torch AdamW, decoupled weight decay)."""
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    """LION: multiplied by lr/peak_lr each step (llm-foundry's convention); AdamW: torch's (times lr)."""
    eps: float = 1e-8
    """AdamW only."""
    state_dtype: str = "fp32"
    """AdamW only: `bf16` stores both moments in bfloat16 (4 bytes a parameter instead of 8; the update is computed
    in float32): what lets full finetuning of a 7B model fit one GPU."""
    offload: str = "none"
    """`cpu` keeps the optimizer state in (pinned) CPU memory and streams it through the GPU chunk by chunk for each
    step (smalto/train/offload.py): the GPU holds only weights, gradients and activations. One process only."""

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, ("lion", "adamw"))
        check_choice("optimizer.state_dtype", self.state_dtype, ("fp32", "bf16"))
        check_choice("optimizer.offload", self.offload, ("none", "cpu"))
        if self.state_dtype == "bf16" and self.name != "adamw":
            raise ConfigError(
                "optimizer.state_dtype = bf16 is for adamw; LION keeps one moment (set it to fp32)"
            )
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr = {self.lr} must be positive")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas = {self.betas} must be two numbers in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay = {self.weight_decay} must not be negative")


@dataclass(kw_only=True)
class SchedulerConfig:
    name: str = "cosine"
    """After a linear warmup from 0: `cosine` or `linear` decay to alpha_f·lr, `constant`, or `inverse_sqrt`."""
    warmup: int | str = "0ba"
    alpha_f: float = 0.1
    """Final lr as a fraction of the peak (cosine, linear)."""
    t_max: int | str = "1dur"
    """Where the decay reaches alpha_f; the whole run by default."""

    def __post_init__(self) -> None:
        check_choice("scheduler.name", self.name, ("cosine", "linear", "constant", "inverse_sqrt"))
        parse_duration(self.warmup, "scheduler.warmup")
        parse_duration(self.t_max, "scheduler.t_max")
        if not 0.0 <= self.alpha_f <= 1.0:
            raise ConfigError(f"scheduler.alpha_f = {self.alpha_f} must be in [0, 1]")


@dataclass(kw_only=True)
class TrainConfig:
    max_duration: int | str = "100ba"
    global_batch_size: int = 8
    """Samples per optimizer step, over all ranks."""
    micro_batch_size: int | None = None
    """Samples per forward on one rank; None = global_batch_size / world_size (no accumulation)."""
    precision: str = "auto"
    """`bf16` (autocast on one device; FSDP2 bf16 params with fp32 reduce when sharded), `fp32`, or `auto`
    (bf16 on CUDA, fp32 on CPU)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; null = no clipping."""
    compile: bool = False
    """torch.compile each block."""
    activation_checkpointing: bool | int | str = False
    """true: every block; an integer k: every k-th block; `selective`: every block, keeping attention's outputs
    (no attention forward in the backward's recompute: smalto/train/checkpointing.py); false: none."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after the forward (ZeRO-3) or keep them for the backward (ZeRO-2)."""
    eval_first: bool = False
    """Evaluate once before the first step (as llm-foundry's eval_first), so the held-out loss has a baseline."""
    grad_sync: str = "micro_batch"
    """FSDP2 with gradient accumulation: reduce-scatter the gradients after every micro-batch's backward
    (`micro_batch`: sharded gradients only) or once per step, after the last (`step`: one reduce-scatter instead of
    one per micro-batch, for 4 bytes per parameter of unsharded float32 gradients held on every rank)."""
    weight_cast: str = "step"
    """One device with bf16: cast the linears' float32 weights to bf16 once per optimizer step and add their bf16
    gradients straight into the float32 `.grad` (`step`: fewer memory passes, the same numbers, 2 bytes per
    parameter held for the step), or let autocast cast them in every micro-batch's forward (`micro_batch`: least
    memory). Ignored under FSDP2, which casts at each all-gather."""
    loss: str = "auto"
    """How the loss is computed from the final hidden states: `chunked` (the head's matmul and the cross-entropy a
    chunk of tokens at a time, never holding the (tokens, vocab) float32 logits: smalto/kernels/chunked_loss.py),
    `full` (the full logits, then a fused cross-entropy), or `auto` (full while a micro-batch's float32 logits take
    at most 8 GiB, where it is faster; chunked above). The same value and gradients."""
    time_limit: str | None = None
    """End the run normally (evaluate, save, export) once this launch has trained this long: "90s", "2m", "1.5h".
    Counted per launch (a relaunch resumes and gets the time again); the schedule stays laid out for max_duration."""
    stop_after: int | None = None
    """End this launch (with a checkpoint) after this many steps; autoresume continues later (job time slices)."""
    eval_interval: int | str = "100ba"
    eval_batches: int = 8
    """Micro-batches per rank in each evaluation; 0 = no evaluation."""
    eval_split: str = "val"
    """Split folder of each data source used for evaluation (skipped with a warning when absent)."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device for MFU; default: looked up by GPU name
    (`smalto.train.metrics.PEAK_BF16_TFLOPS`, e.g. 989 for H100/H200), none on CPU or an unknown GPU (warned)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts to continue with the trained model at the end (printed)."""
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        parse_duration(self.max_duration, "train.max_duration")
        parse_duration(self.eval_interval, "train.eval_interval")
        check_choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        check_choice("train.grad_sync", self.grad_sync, ("micro_batch", "step"))
        check_choice("train.weight_cast", self.weight_cast, ("step", "micro_batch"))
        check_choice("train.loss", self.loss, ("auto", "chunked", "full"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"train.device = {self.device!r} is not allowed; choose one of: auto, cpu, cuda"
            )
        if self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size = {self.global_batch_size} must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size = {self.micro_batch_size} must be positive or null")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and ac != "selective" and (not isinstance(ac, int) or ac < 1):
            raise ConfigError(
                f"train.activation_checkpointing = {ac!r}: use true, false, a positive integer k (every k-th"
                " block) or selective (every block, keeping attention's outputs)"
            )
        if self.time_limit is not None:
            parse_seconds(self.time_limit, "train.time_limit")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(
                f"train.stop_after = {self.stop_after} must be a positive number of steps or null"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip = {self.grad_clip} must be positive or null")


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int | str = "1000ba"
    """Save every this many steps (the last step and a SIGTERM/SIGINT always save)."""
    keep_last: int = 3
    folder: str = "{run_dir}/checkpoints"
    autoresume: bool = True
    """Continue from `latest` in `folder` when it exists (with any number of ranks)."""
    load_from: str | None = None
    """Initialise the weights from a smalto checkpoint folder or an HF folder (ignored when autoresuming)."""
    hf_export: str | None = "{run_dir}/hf"
    """Write an HF folder (config.json + safetensors + tokenizer) here at the end; null = don't."""

    def __post_init__(self) -> None:
        parse_duration(self.interval, "checkpoint.interval")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last = {self.keep_last} must be at least 1")


@dataclass(kw_only=True)
class LoggingConfig:
    interval: int = 1
    """Write metrics every this many steps."""
    progress: bool = True
    """A live progress bar on a terminal; otherwise (a log file, nohup, slurm, CI, or false here) plain lines."""
    print_interval: int | None = None
    """Steps between plain progress lines (step, loss, tokens/s, ETA); None: about 20 per run, and one at least
    every minute."""
    tensorboard: bool | None = None
    """None: when the tensorboard package is installed."""
    wandb: bool = False
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"logging.interval = {self.interval} must be at least 1")
        if self.print_interval is not None and self.print_interval < 1:
            raise ConfigError(f"logging.print_interval = {self.print_interval} must be at least 1 or null")


@dataclass(kw_only=True)
class GuardConfig:
    """Loss guards, as llm-foundry's kill-loss-spike callback."""

    nan: str = "stop"
    """A NaN/inf loss: `stop` (no update, checkpoint from before, message) or `skip` the batch."""
    spike: str = "stop"
    """A loss above spike_ratio × the rolling mean: `stop` after `patience` consecutive spikes, `skip` each
    spiking batch (stopping after `patience` in a row), or `off`."""
    spike_ratio: float = 2.0
    window: int = 100
    patience: int = 4
    min_history: int = 20
    """Spikes are only judged once this many steps are in the window."""

    def __post_init__(self) -> None:
        check_choice("guard.nan", self.nan, ("stop", "skip"))
        check_choice("guard.spike", self.spike, ("stop", "skip", "off"))
        if self.spike_ratio <= 1.0:
            raise ConfigError(f"guard.spike_ratio = {self.spike_ratio} must be greater than 1")
        if self.window < 1 or self.patience < 1 or self.min_history < 1:
            raise ConfigError("guard.window, guard.patience and guard.min_history must be at least 1")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/{name}"
    seed: int = 17
    """Seeds weights, dropout and (unless data.seed is given) the data order."""
    prepare: str | None = None
    """`stdlib`: build the tokenizer and data this recipe points at from the Python standard library when they
    don't exist yet (the embedded demo)."""
    tokenizer: str | None = None
    model: MPTConfig = field(default_factory=MPTConfig)
    data: Any = None
    """smalto.data.stream.DataConfig."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    base_model: str | None = None
    """`smalto finetune` only: the model to start from (anything `smalto.load` reads)."""
    finetune: Any = None
    """`smalto finetune` only: smalto.train.finetune.FinetuneSection (template, samples)."""
    lora: Any = None
    """`smalto finetune` / `smalto dpo`: smalto.adapters.LoraConfig when the recipe has a `lora` section."""
    dpo: Any = None
    """`smalto dpo` only: smalto.train.dpo.DPOSection (beta, loss_type, label_smoothing, reference)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], data_cls: Any = None, extra: Any = None) -> RunConfig:
        """`data_cls` (default: the pretraining stream's DataConfig) builds the data section; `extra` is what
        `smalto finetune` adds (base_model and the finetune section: smalto.train.finetune builds them)."""
        from smalto.data.stream import DataConfig

        if not isinstance(d, dict):
            raise ConfigError(f"a recipe must be a mapping of sections, got {type(d).__name__}")
        own = [
            f.name for f in dataclasses.fields(cls) if f.name not in ("base_model", "finetune", "lora", "dpo")
        ]
        check_keys("", d, own + list(extra or {}))
        hints = typing.get_type_hints(cls)
        top = {
            k: check_type(k, d[k], hints[k])
            for k in ("name", "run_dir", "seed", "prepare", "tokenizer")
            if k in d
        }
        name, seed = top.get("name", "run"), top.get("seed", 17)
        run_dir = fill("run_dir", top.get("run_dir", "runs/{name}"), name=name)
        model = MPTConfig.from_dict(d.get("model") or {})
        if d.get("data") is None:
            raise ConfigError(
                "the recipe has no data section; set data.sources to a list of {path: ...} datasets"
            )
        data = _build_data(data_cls or DataConfig, d["data"], model.max_seq_len, run_dir, seed)
        sections = {
            "optimizer": OptimizerConfig,
            "scheduler": SchedulerConfig,
            "train": TrainConfig,
            "checkpoint": CheckpointConfig,
            "logging": LoggingConfig,
            "guard": GuardConfig,
        }
        built: dict[str, Any] = {k: build(c, d.get(k), k) for k, c in sections.items()}
        ck = built["checkpoint"]
        ck.folder = fill("checkpoint.folder", ck.folder, run_dir=run_dir)
        if ck.hf_export:
            ck.hf_export = fill("checkpoint.hf_export", ck.hf_export, run_dir=run_dir)
        tok, prepare = top.get("tokenizer"), top.get("prepare")
        if prepare is not None:
            demos = (
                ("stdlib",)
                if extra is None
                else ("stdlib-preferences",)
                if "dpo" in extra
                else ("stdlib-instruct",)
            )
            check_choice("prepare", prepare, demos)
        cfg = cls(
            name=name,
            run_dir=run_dir,
            seed=seed,
            prepare=prepare,
            tokenizer=None if tok is None else fill("tokenizer", tok, run_dir=run_dir),
            model=model,
            data=data,
            **built,
            **(extra or {}),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """Cross-section checks that need no knowledge of the world size."""
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) is longer than model.max_seq_len ({self.model.max_seq_len})"
            )
        t = self.train
        if t.micro_batch_size is not None and t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "run_dir": self.run_dir, "seed": self.seed}
        d["prepare"], d["tokenizer"] = self.prepare, self.tokenizer
        if self.base_model is not None:
            d["base_model"] = self.base_model
        for key in ("finetune", "lora", "dpo"):
            if getattr(self, key) is not None:
                d[key] = dataclasses.asdict(getattr(self, key))
        d["model"] = self.model.to_dict()
        d["data"] = dataclasses.asdict(self.data)
        for k in ("optimizer", "scheduler", "train", "checkpoint", "logging", "guard"):
            d[k] = dataclasses.asdict(getattr(self, k))
        return d


def _build_data(cls: Any, d: Any, max_seq_len: int, run_dir: str, seed: int) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"data must be a mapping, got {d!r}")
    d = {"seq_len": max_seq_len, "seed": seed, **d}
    for key in ("sources", "eval_sources"):
        if isinstance(d.get(key), list):
            d[key] = [
                {**s, "path": fill(f"data.{key}[{i}].path", s["path"], run_dir=run_dir)}
                if isinstance(s, dict) and isinstance(s.get("path"), str)
                else s
                for i, s in enumerate(d[key])
            ]
    return cls.from_dict(d)


# ---- loading ----


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); recipes mean the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def recipe_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_recipe(spec: str) -> Path:
    """A YAML path, or the name of a shipped recipe (`tiny`, `mpt-1b`, ...)."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {spec} does not exist")
        return p
    shipped = CONFIG_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"no recipe {spec!r}: give a YAML path or one of: {', '.join(recipe_names())}")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` with the value parsed as YAML (`lr=1e-3` is a float, `x=[1,2]` a list, `x=null` None)."""
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.max_duration=200ba)")
        key, raw = item.split("=", 1)
        try:
            value = read_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        parts = key.strip().split(".")
        node = d
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return d


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The sections of the recipe file at `path` (YAML holding a mapping; empty is {})."""
    try:
        d = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got a {type(d).__name__}")
    return d


def load_config(spec: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (path or shipped name; default `tiny`), apply overrides, validate everything."""
    path = find_recipe(spec or "tiny")
    d = read_recipe_file(path)
    if "base_model" in d:
        command, kind = recipe_command(d)
        raise ConfigError(f"{path} is a {kind} recipe (it has base_model): run `smalto {command} {spec}`")
    return RunConfig.from_dict(apply_overrides(d, overrides or []))


def recipe_command(d: dict[str, Any]) -> tuple[str, str]:
    """The command that runs a recipe starting from a base model, and what to call the recipe, by its sections."""
    for section, kind in (("ppo", "PPO"), ("dpo", "DPO"), ("reward", "reward-model")):
        if section in d:
            return section, kind
    return "finetune", "finetuning"
