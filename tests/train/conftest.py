"""A tiny tokenizer and MDS dataset (train + val) built once per session with the real pipeline, and helpers to run
`smalto train` in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smalto.demo import stdlib_files, train_tokenizer
from tests import forkrun
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]

# a tiny MPT for in-process tests of the trainer's model (3 layers: every-2nd-block checkpointing wraps 2)
TINY_MODEL = tiny_config(n_layers=3, no_bias=True, attn_config={"alibi": True, "attn_impl": "eager"})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    from smalto.data.tokenize import TokenizeConfig, tokenize_to_shards

    root = tmp_path_factory.mktemp("tiny_data")
    texts = [p.read_text(errors="replace") for p in stdlib_files(400_000)]
    train_tokenizer(texts, 384, root / "tok", 64)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenize_to_shards(
        TokenizeConfig(
            sources=[str(corpus)],
            out=root / "data",
            tokenizer=str(root / "tok"),
            seq_len=64,
            val_fraction=0.1,
            progress=False,
        )
    )
    return {"data": str(root / "data"), "tokenizer": str(root / "tok")}


def recipe(tiny_data: dict[str, str], run_dir: Path, **sections) -> dict:
    """A tiny recipe (d_model 64, 2 layers, vocab 384, seq 64) writing into run_dir; sections update it."""
    r = {
        "name": "t",
        "run_dir": str(run_dir),
        "seed": 3,
        "tokenizer": tiny_data["tokenizer"],
        "model": {
            "d_model": 64,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 64,
            "vocab_size": 384,
            "no_bias": True,
            "attn_config": {"alibi": True, "attn_impl": "sdpa"},
        },
        "data": {"sources": [{"path": tiny_data["data"]}], "seq_len": 64},
        "optimizer": {"name": "lion", "lr": 3e-3, "weight_decay": 1e-4},
        "scheduler": {"name": "cosine", "warmup": "2ba"},
        "train": {
            "max_duration": "8ba",
            "global_batch_size": 8,
            "device": "cpu",
            "precision": "fp32",
            "eval_interval": "4ba",
            "eval_batches": 2,
        },
        "checkpoint": {"interval": "100ba", "keep_last": 2, "hf_export": None},
        "logging": {"progress": False, "tensorboard": False},
    }
    for k, v in sections.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) and isinstance(r.get(k), dict) else v
    return r


def run_smalto(
    args: list[str],
    *,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 240,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    """`python -m smalto ARGS` in a new process from the repo root (under torchrun when nproc > 1); `env` adds to
    the environment; `stdin` is its input."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    launch = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    )
    p = forkrun.run(
        [sys.executable, *launch, "-m", "smalto", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_cli(
    rec: dict, tmp: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: float = 240
) -> subprocess.CompletedProcess:
    """`smalto train RECIPE overrides...` in a new process (under torchrun when nproc > 1)."""
    path = tmp / f"recipe-{os.getpid()}-{len(list(tmp.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return run_smalto(["train", str(path), *overrides], nproc=nproc, check=check, timeout=timeout)


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]
