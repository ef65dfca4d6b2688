"""`smalto convert`: any checkpoint smalto can read in, an HF folder out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smalto.errors import CheckpointError
from smalto.hf.load import load_pretrained
from smalto.hf.save import TOKENIZER_FILES, save_pretrained
from smalto.model.mpt import MPTForCausalLM


def load_any(path: str | Path, **kwargs: Any) -> MPTForCausalLM:
    """Load any checkpoint smalto reads as an `MPTForCausalLM`.

    HF folders, and smalto training checkpoints (a run folder, its checkpoints/ folder or one step_* folder; read
    with `smalto.train.checkpoint.load_training_checkpoint`), so `smalto convert`, `smalto generate` and
    `smalto chat` accept both.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path} does not exist")
    if (p / "config.json").is_file():
        return load_pretrained(p, **kwargs)
    from smalto.train.checkpoint import find_checkpoint, load_training_checkpoint

    if find_checkpoint(p) is not None:  # a run folder, its checkpoints/ folder, or one step_* folder
        from smalto.hf.load import parse_device, parse_dtype

        return load_training_checkpoint(
            p, device=parse_device(kwargs.get("device") or "cpu"), dtype=parse_dtype(kwargs.get("dtype"))
        )
    raise CheckpointError(
        f"{path} is not a model folder smalto can read (expected an HF folder with config.json)"
    )


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    safe_serialization: bool = True,
) -> Path:
    """Read `src` (see `load_any`), write an HF folder at `dst` with the weights cast to `dtype` if given.

    Tokenizer files found next to the source weights (or, for a training run, its recorded tokenizer; see
    `find_tokenizer`) are copied along.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError("convert writes a new folder: give a destination different from the source")
    model = load_any(src, dtype=dtype)
    return save_pretrained(
        model,
        dst,
        tokenizer=find_tokenizer(src),
        shard_size=shard_size,
        dtype=dtype,
        safe_serialization=safe_serialization,
    )


def load_model_and_tokenizer(
    model_path: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    max_seq_len: int | None = None,
) -> tuple[MPTForCausalLM, Any]:
    """What `smalto generate` / `chat` / `serve` need: the model (on `device`, default cuda when available) and
    its tokenizer (from `tokenizer_path`, else the model folder, else a training run's recorded tokenizer)."""
    from smalto.hf.load import parse_device, parse_dtype
    from smalto.tokenizer import load_tokenizer

    parse_dtype(dtype)  # refuse a bad --dtype / --device before reading anything
    dev = parse_device(device)
    tok_src = Path(tokenizer_path) if tokenizer_path else find_tokenizer(model_path)
    if tok_src is None:
        if not _is_model(model_path):
            load_any(model_path)  # raises without reading weights: says why the path is no model
        raise CheckpointError(
            f"{model_path} holds no tokenizer files (and records no training tokenizer); "
            "pass --tokenizer (a folder or tokenizer.json)"
        )
    model = load_any(model_path, dtype=dtype, device=dev, max_seq_len=max_seq_len)
    return model, load_tokenizer(tok_src)


def _is_model(path: str | Path) -> bool:
    from smalto.train.checkpoint import find_checkpoint

    p = Path(path)
    return p.is_dir() and ((p / "config.json").is_file() or find_checkpoint(p) is not None)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def find_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer that goes with a model path: its own tokenizer files, else, for a training run (the run folder,
    its checkpoints/ or a step_* folder), the `tokenizer:` recorded in the run's config.yaml or RUN/tokenizer."""
    p = Path(path)
    if _has_tokenizer(p):
        return p
    from smalto.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(p) if p.is_dir() else None
    if ckpt is None:
        return None
    # step_* → checkpoints/ → the run folder, which holds the resolved recipe
    run = next((f for f in (ckpt, ckpt.parent, ckpt.parent.parent) if (f / "config.yaml").is_file()), None)
    candidates: list[Path] = []
    if run is not None:
        from smalto.config import read_yaml

        try:
            recorded = read_yaml((run / "config.yaml").read_text()) or {}
        except Exception:  # an unreadable config.yaml only costs the fallback
            recorded = {}
        tok, run_dir = recorded.get("tokenizer"), recorded.get("run_dir")
        if isinstance(tok, str) and tok:
            candidates.append(Path(tok))  # absolute, or relative to where training ran (usually here)
            parts = (
                Path(run_dir).parts if isinstance(run_dir, str) and not Path(run_dir).is_absolute() else ()
            )
            here = run.resolve()
            if parts and not Path(tok).is_absolute() and here.parts[-len(parts) :] == parts:
                candidates.append(here.parents[len(parts) - 1] / tok)  # where training ran, if moved since
        candidates.append(run / "tokenizer")
    for c in candidates:
        if (c.is_file() and c.suffix == ".json") or (c.is_dir() and _has_tokenizer(c)):
            return c
    return None
