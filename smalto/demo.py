"""The embedded default: a corpus every machine with Python has, the source of its standard library.

`prepare_stdlib(cfg)` (run when a recipe says `prepare: stdlib`, as `tiny` does) builds what the recipe points at:
  1. the corpus: the stdlib's *.py files (tests and site-packages left out), in a fixed pseudo-random order of
     their relative paths, up to `CORPUS_BYTES`, one JSON line per file;
  2. a byte-level BPE tokenizer of `model.vocab_size` tokens trained on it with the `tokenizers` library (the
     50k GPT-NeoX vocabulary would dominate a CPU step), saved as an HF tokenizer folder;
  3. MDS token shards with train/ and val/ splits, written by the data pipeline (`smalto.data.tokenize`).
Nothing is downloaded; everything lands in the run folder, built in a temporary folder and renamed into place
(Ctrl-C leaves nothing half-written). A second run reuses what exists. A path outside the run folder, or a
folder there that the demo did not make, is refused: the demo never writes over the user's files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from smalto.config import RunConfig
from smalto.errors import ConfigError

CORPUS_BYTES = 6_000_000  # enough for a few minutes of CPU training, quick to tokenize
EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files(limit_bytes: int = CORPUS_BYTES) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts)]
    # a stable spread over the whole library, not the first letters of the alphabet
    files.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > limit_bytes:
            continue
        chosen.append(p)
        total += size
    return chosen


def functions_in(files: list[Path]) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, list[str]]]:
    """Every function definition of `files` (in file order, then `ast.walk` order) with the lines of its file;
    a file that does not parse is skipped."""
    for f in files:
        source = f.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield node, lines


def train_tokenizer(texts: list[str], vocab_size: int, out: Path, max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": EOS,
        "unk_token": EOS,
        "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": EOS, "bos_token": EOS, "unk_token": EOS})
    )


MARK = ".smalto-stdlib"  # in each folder the demo made: only those may be rebuilt over


def prepare_stdlib(cfg: RunConfig, console: Console | None = None) -> None:
    """Build the demo's tokenizer and data where the recipe points, both inside `run_dir`, atomically.

    A folder that exists and was not made here (no `MARK` in it) is never written over, and a path outside the
    run folder is refused: the demo's files go nowhere the user keeps their own."""
    from smalto.data.tokenize import TokenizeConfig, tokenize_to_shards

    console = console or Console(stderr=True)
    if cfg.tokenizer is None or len(cfg.data.sources) != 1:
        raise ConfigError(
            "prepare: stdlib needs `tokenizer` and exactly one data source (where to write them)"
        )
    tok_dir, data_dir = Path(cfg.tokenizer), Path(cfg.data.sources[0].path)
    if (tok_dir / "tokenizer.json").is_file() and (data_dir / "train" / "index.json").is_file():
        return  # made by an earlier launch: reused, never rebuilt
    run = Path(cfg.run_dir)
    for key, path in (("tokenizer", tok_dir), ("data.sources[0].path", data_dir)):
        check_target(key, path, run)
    t0 = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    for stale in run.glob(".stdlib.partial-*"):  # left by a launch that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run / f".stdlib.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        files = stdlib_files()
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        console.print(
            f"corpus: {len(files)} files of the Python {sysconfig.get_python_version()} standard library, "
            f"{sum(map(len, texts)) / 1e6:.1f} M characters"
        )
        train_tokenizer(texts, cfg.model.vocab_size, tmp / "tokenizer", cfg.model.max_seq_len)
        console.print(f"tokenizer: byte-level BPE, {cfg.model.vocab_size} tokens → {escape(str(tok_dir))}")
        corpus = tmp / "stdlib.jsonl"
        with corpus.open("w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        tokenize_to_shards(
            TokenizeConfig(
                sources=[str(corpus)],
                out=tmp / "data",
                tokenizer=str(tmp / "tokenizer"),
                seq_len=cfg.data.seq_len,
                val_fraction=0.03,
                dtype="uint16" if cfg.model.vocab_size <= 1 << 16 else "int32",
                progress=False,
            )
        )
        for part, dest in (("tokenizer", tok_dir), ("data", data_dir)):
            (tmp / part / MARK).write_text("made by smalto's `prepare: stdlib`; rebuilt when incomplete\n")
            if dest.exists():
                shutil.rmtree(dest)  # ours (check_target): an incomplete earlier build
            dest.parent.mkdir(parents=True, exist_ok=True)
            (tmp / part).rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives an error or Ctrl-C
    console.print(
        f"data: MDS shards in {escape(str(data_dir))} ({time.perf_counter() - t0:.1f} s to prepare)"
    )


def check_target(key: str, path: Path, run: Path) -> None:
    """Refuse to build the demo's `key` at `path` unless it lies inside the run folder and holds nothing of the
    user's (it is absent, empty, or an earlier demo build)."""
    inside = path.resolve().is_relative_to(run.resolve()) and path.resolve() != run.resolve()
    if not inside:
        raise ConfigError(
            f"{key} = {path} is outside the run folder {run}: `prepare: stdlib` (the demo) builds its own "
            "tokenizer and data there and writes nowhere else. To train this recipe on your own data, add "
            "prepare=null and tokenizer=YOUR_TOKENIZER (with model.vocab_size to match); to keep the demo, "
            f"leave {key} at its default"
        )
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / MARK).exists())):
        raise ConfigError(
            f"{key} = {path} already exists and was not made by `prepare: stdlib`, which does not write over it; "
            f"move it away, point {key} at a new folder, or add prepare=null to train on it as it is"
        )
