"""What a run reports: the JSONL metrics file, TensorBoard / W&B when available, the progress bar, the summary.

Only rank 0 writes. `metrics.jsonl` holds one JSON object per logged step (and per evaluation); on resume the
lines past the resumed step are dropped (the file rewritten atomically; a line torn by a crash is skipped with a
warning), so the file reads as one uninterrupted run, and TensorBoard purges them the same way (`purge_step`).
MFU follows llm-foundry: tokens/s per device × flops_per_token / peak FLOP/s, with
flops_per_token = 6·N + 12·n_layers·d_model·seq (`MPTConfig.flops_per_token`). A LoRA run counts what it computes:
4 FLOPs a token for each frozen parameter (the forward and the input's gradient, no weight gradient), 6 for each
trainable one (`lora_flops_per_token`).
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from smalto.config import RunConfig
from smalto.train.durable import replace_durably

METRICS = "metrics.jsonl"


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    except ImportError:  # pragma: no cover
        return 0.0


class RunLogger:
    def __init__(self, cfg: RunConfig, *, enabled: bool, total_steps: int, console: Console | None = None):
        self.cfg, self.enabled = cfg, enabled
        self.console = console or Console(stderr=True)
        self.path = Path(cfg.run_dir) / METRICS
        self.total_steps = total_steps
        self.tb: Any = None
        self.wandb: Any = None
        self.file: Any = None
        self.progress: Progress | None = None
        self.last: dict[str, Any] = {}
        self.start_step, self.start_time, self.printed_at = 0, 0.0, 0.0

    def start(self, start_step: int) -> None:
        """Open the outputs once the step we start from (0, or a resumed one) is known."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate(self.path, start_step)
        self.file = self.path.open("a")
        self._open_backends(start_step)
        self.start_step, self.start_time = start_step, time.monotonic()
        self.printed_at = self.start_time
        if (
            self.cfg.logging.progress and self.console.is_terminal
        ):  # a bar in a log file is one line at the end
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
                refresh_per_second=4,
            )
            self.task = self.progress.add_task("train", total=self.total_steps, completed=start_step, info="")
            self.progress.start()

    def _open_backends(self, start_step: int) -> None:
        lc = self.cfg.logging
        if lc.tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run re-logs the steps after its checkpoint: purge_step makes readers drop the
                # first launch's points from there on, as _truncate does in metrics.jsonl
                self.tb = SummaryWriter(str(Path(self.cfg.run_dir) / "tb"), purge_step=start_step + 1)
            except ImportError:
                if lc.tensorboard:
                    warnings.warn(
                        "logging.tensorboard is true but tensorboard is not installed: pip install tensorboard",
                        stacklevel=2,
                    )
        if lc.wandb:
            try:
                import wandb
            except ImportError:
                warnings.warn(
                    "logging.wandb is true but wandb is not installed: pip install wandb", stacklevel=2
                )
            else:
                self.wandb = wandb.init(
                    project=lc.wandb_project or "smalto",
                    name=self.cfg.name,
                    config=self.cfg.to_dict(),
                    resume="allow",
                )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.last.update(metrics)
        if step % self.cfg.logging.interval == 0 or "eval/loss" in metrics or step == self.total_steps:
            self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
            self.file.flush()
            for k, v in metrics.items():
                if isinstance(v, int | float) and self.tb is not None:
                    self.tb.add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log(metrics, step=step)
        if self.progress is not None:
            m = self.last
            info = f"loss {m.get('train/loss', float('nan')):.4f}  {m.get('throughput/tokens_per_s', 0):,.0f} tok/s"
            if m.get("throughput/mfu") is not None:
                info += f"  MFU {100 * m['throughput/mfu']:.1f}%"
            info += f"  mem {m.get('memory/peak_gib', 0):.1f} GiB"
            if "eval/loss" in m:
                info += f"  val {m['eval/loss']:.3f}"
            self.progress.update(self.task, completed=step, info=info)
        elif self._print_due(step, metrics):
            self.console.print(self._line(step), highlight=False, markup=False, soft_wrap=True)

    def _print_due(self, step: int, metrics: dict[str, Any]) -> bool:
        every = self.cfg.logging.print_interval
        if every is not None:
            return step % every == 0 or step == self.total_steps
        return (
            "eval/loss" in metrics
            or step % max(1, self.total_steps // 20) == 0
            or step == self.total_steps
            or time.monotonic() - self.printed_at >= 60
        )

    def _line(self, step: int) -> str:
        """A plain progress line: step, loss, tokens/s, validation loss when there is one, time left."""
        m, now = self.last, time.monotonic()
        self.printed_at = now
        done = step - self.start_step
        eta = (now - self.start_time) / done * (self.total_steps - step) if done > 0 else None
        line = f"step {step}/{self.total_steps}  loss {m.get('train/loss', float('nan')):.4f}"
        line += f"  {m.get('throughput/tokens_per_s', 0):,.0f} tok/s"
        if "eval/loss" in m:
            line += f"  val {m['eval/loss']:.3f}"
        return line + f"  ETA {_clock(eta)}"

    def print(self, *args: Any) -> None:
        if self.enabled:
            self.console.print(*args)

    def close(self) -> None:
        if self.file is None:
            return
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.file.close()
        self.file = None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def summary(self, rows: dict[str, str]) -> None:
        if not self.enabled:
            return
        table = Table(title=f"run {self.cfg.name}", show_header=False)
        for k, v in rows.items():
            table.add_row(k, Text(v))  # text, not markup: 'pip install "smalto[cudnn]"' keeps its brackets
        self.console.print(table)


def _truncate(path: Path, start_step: int) -> None:
    """Drop metrics logged past `start_step` by an interrupted run we are resuming.

    A line cut short by a full disk or a power loss is skipped with a warning, so that autoresume is never
    blocked by it. The kept lines go to a temporary file, fsynced, then `os.replace`d over the old one: a crash
    (or a full disk) during the rewrite leaves the old file whole."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    keep, torn = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            torn.append(n)
            continue
        if step <= start_step:
            keep.append(line)
    if torn:
        warnings.warn(
            f"{path}: skipped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}; cut short by "
            "a crash or a full disk?)",
            stacklevel=3,
        )
    replace_durably(path, "".join(line + "\n" for line in keep))


def lora_flops_per_token(model: torch.nn.Module, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token of a model whose frozen weights get no gradient: 4·frozen + 6·trainable parameters,
    plus llm-foundry's attention term 12·n_layers·d_model·seq (attention's products are all still computed)."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * frozen + 6 * trainable + 12 * n_layers * d_model * seq_len


def mfu(
    tokens_per_s: float, flops_per_token: int, world_size: int, peak_tflops: float | None
) -> float | None:
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / world_size / (peak_tflops * 1e12)


# Dense bf16 tensor-core TFLOP/s (fp32 accumulate, no 2:4 sparsity) by a substring of torch.cuda.get_device_name(),
# first match wins, so a name that contains another (GH200 ⊃ H200, L40S ⊃ L4, A100 ⊃ A10) comes before it.
# Datasheets that print only the sparse figure ("1,979*") are halved.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),  # GB200 NVL72 datasheet: FP16/BF16 360 PFLOPS sparse / 72 GPUs / 2
    ("B200", 2250.0),  # HGX B200 datasheet: FP16/BF16 36 PFLOPS sparse / 8 GPUs / 2
    ("GH200", 989.0),  # GH200 Grace Hopper datasheet: BF16 1,979 TFLOPS sparse / 2
    ("H200 NVL", 835.0),  # H200 datasheet, NVL column: BF16 1,671 TFLOPS sparse / 2
    ("H200", 989.0),  # H200 datasheet, SXM column: BF16 1,979 TFLOPS sparse / 2
    ("H100 NVL", 835.0),  # H100 datasheet, NVL column: BF16 1,671 TFLOPS sparse / 2
    ("H100 PCIe", 756.0),  # H100 datasheet, PCIe column: BF16 1,513 TFLOPS sparse / 2
    ("H100", 989.0),  # H100 datasheet, SXM column ("NVIDIA H100 80GB HBM3"): BF16 1,979 TFLOPS sparse / 2
    ("A100", 312.0),  # A100 datasheet: BF16 312 | 624 sparse (SXM and PCIe alike)
    ("A10G", 70.0),  # AWS's A10G, no NVIDIA datasheet: 80 SMs at 1.71 GHz, half-rate fp32 accumulate (GA102)
    ("A10", 125.0),  # A10 datasheet: BF16 125 | 250 sparse
    ("L40S", 362.0),  # L40S datasheet: BF16 362.05 | 733 sparse
    ("L40", 181.0),  # L40 datasheet: BF16 181.05 | 362.1 sparse
    ("L4", 121.0),  # L4 datasheet: BF16 242 TFLOPS sparse / 2
    ("RTX 4090", 165.0),  # Ada whitepaper, appendix: BF16 tensor, FP32 accumulate, 165.2 | 330.4 sparse
)


def peak_tflops(device: torch.device, name: str | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one `device` for MFU, looked up by its name (`name` overrides
    `torch.cuda.get_device_name`); None on CPU, and None with a warning for a GPU not in `PEAK_BF16_TFLOPS`."""
    if device.type != "cuda":
        return None
    return _peak_by_name(name if name is not None else torch.cuda.get_device_name(device))


@functools.cache
def _peak_by_name(name: str) -> float | None:  # cached: one warning per GPU name
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    warnings.warn(
        f"no peak bf16 TFLOP/s known for {name!r}, so no MFU is reported; set train.peak_tflops to its "
        "dense bf16 figure",
        stacklevel=3,
    )
    return None


def write_run_info(cfg: RunConfig, world_size: int, device: torch.device) -> None:
    """The resolved recipe and the facts a run depends on, next to its checkpoints."""
    import platform

    import yaml

    from smalto.version import __version__

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info = {
        "smalto": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": world_size,
        "seed": cfg.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    with (run / "runs.jsonl").open("a") as f:  # one line per launch (a resumed run has several)
        f.write(json.dumps(info) + "\n")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
