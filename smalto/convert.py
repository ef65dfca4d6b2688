"""`smalto convert`: any model `smalto.load` reads in, an HF folder out (16-bit, or int8 / int4 quantized)."""

from __future__ import annotations

from pathlib import Path

from smalto.errors import CheckpointError, ConfigError


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    safe_serialization: bool = True,
    quantize: str | None = None,
    group_size: int = 128,
    symmetric: bool = False,
    quantize_head: bool = False,
) -> Path:
    """Read `src` (any format `smalto.load` reads), write an HF folder at `dst` with the weights cast to `dtype` if
    given; returns `dst`.

    Tokenizer files found next to the source weights (or, for a training run, its recorded tokenizer; see
    `smalto.load.find_tokenizer`) are copied along.

    quantize: 'int8' or 'int4' (with `group_size` and `symmetric`; `quantize_head`: the output matrix too): write a
    quantized folder (docs/quantize.md); a quantized source stays quantized. Quantized folders are safetensors only.
    """
    from smalto.hf.save import save_pretrained
    from smalto.load import find_tokenizer, load

    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError("convert writes a new folder: give a destination different from the source")
    if quantize is None and quantize_head:
        raise ConfigError("--quantize-head quantizes the head too: give it with --quantize int8|int4")
    if quantize is not None:
        from smalto.quant import QuantSpec

        quant = QuantSpec(format=quantize, group_size=group_size, symmetric=symmetric, head=quantize_head)
        if not safe_serialization:
            raise ConfigError("a quantized folder is written as safetensors only; drop --bin")
        model = load(src, dtype=dtype, quantize=quant)
    else:
        model = load(src, dtype=dtype)
    from smalto.quant import quant_spec_of

    if quant_spec_of(model) is not None:
        from smalto.quant.folder import save_quantized

        return save_quantized(model, dst, tokenizer=find_tokenizer(src), shard_size=shard_size)
    return save_pretrained(
        model,
        dst,
        tokenizer=find_tokenizer(src),
        shard_size=shard_size,
        dtype=dtype,
        safe_serialization=safe_serialization,
    )
