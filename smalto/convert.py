"""`smalto convert`: any model `smalto.load` reads in, an HF folder out."""

from __future__ import annotations

from pathlib import Path

from smalto.errors import CheckpointError


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    safe_serialization: bool = True,
) -> Path:
    """Read `src` (any format `smalto.load` reads), write an HF folder at `dst` with the weights cast to `dtype` if
    given; returns `dst`.

    Tokenizer files found next to the source weights (or, for a training run, its recorded tokenizer; see
    `smalto.load.find_tokenizer`) are copied along.
    """
    from smalto.hf.save import save_pretrained
    from smalto.load import find_tokenizer, load

    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError("convert writes a new folder: give a destination different from the source")
    model = load(src, dtype=dtype)
    return save_pretrained(
        model,
        dst,
        tokenizer=find_tokenizer(src),
        shard_size=shard_size,
        dtype=dtype,
        safe_serialization=safe_serialization,
    )
