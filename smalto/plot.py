"""`smalto plot RUN`: loss (train and validation), learning rate and throughput of a run, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from smalto.errors import ConfigError, DataError


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; give the folder of a run (runs/<name>)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {n} is not valid JSON ({e.msg}); fix or delete that line: {line[:80]!r}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n} is not a JSON object; fix or delete that line: {line[:80]!r}")
        rows.append(row)
    return rows


def plot_run(run: str | Path, out: str | Path | None = None) -> str:
    """Write the PNG (creating its folder) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("smalto plot needs matplotlib: pip install 'smalto[plot]'") from None
    rows = read_metrics(run)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    if not train:
        raise DataError(f"{run}/metrics.jsonl holds no training steps yet")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="validation")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    axes[1].plot([r["step"] for r in train], [r["train/lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["throughput/tokens_per_s"] for r in train], lw=1)
    axes[2].set(title="throughput", xlabel="step", ylabel="tokens/s")
    fig.suptitle(Path(run).name)
    fig.tight_layout()
    out = Path(out) if out else Path(run) / "curves.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        plt.close(fig)
        raise ConfigError(
            f"-o {out}: cannot create its folder {out.parent} ({e.strerror}); choose another path"
        ) from None
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)
