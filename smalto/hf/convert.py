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
        from smalto.hf.load import parse_dtype

        return load_training_checkpoint(
            p, device=kwargs.get("device") or "cpu", dtype=parse_dtype(kwargs.get("dtype"))
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

    Tokenizer files found next to the source weights are copied along.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError("convert writes a new folder: give a destination different from the source")
    model = load_any(src, dtype=dtype)
    has_tok = any((Path(src) / f).is_file() for f in TOKENIZER_FILES[:2])
    return save_pretrained(
        model,
        dst,
        tokenizer=Path(src) if has_tok else None,
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
    its tokenizer (from `tokenizer_path`, else the model folder)."""
    import torch

    from smalto.tokenizer import load_tokenizer

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any(model_path, dtype=dtype, device=dev, max_seq_len=max_seq_len)
    tok_src = Path(tokenizer_path) if tokenizer_path else Path(model_path)
    if tokenizer_path is None and not any((tok_src / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{model_path} holds no tokenizer files; pass --tokenizer (a folder or tokenizer.json)"
        )
    return model, load_tokenizer(tok_src)
