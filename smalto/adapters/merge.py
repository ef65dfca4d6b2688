"""`smalto merge BASE ADAPTER OUT`: the base with a LoRA adapter added into its weights, as a plain HF folder that
transformers loads without PEFT."""

from __future__ import annotations

from pathlib import Path

from smalto.errors import CheckpointError


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str | None = "auto",
    shard_size: str = "5GB",
) -> str:
    """Write the merged model to `out` (in the base's dtype unless `dtype` says otherwise); returns what was done.
    The sums are taken in float32; a base stored in NF4 is dequantized first (and the message says so)."""
    import torch

    import smalto
    from smalto.adapters.lora import merged_model
    from smalto.adapters.peft import load_adapter
    from smalto.hf.save import save_pretrained
    from smalto.load import _has_tokenizer, find_tokenizer

    for name, path in (("base", base), ("adapter", adapter)):
        if Path(path).resolve() == Path(out).resolve():
            raise CheckpointError(f"merge writes a new folder: OUT must differ from the {name} ({path})")
    model = smalto.load(base, dtype=None if dtype in (None, "auto") else dtype)
    stored = model.dtype
    if any(p.is_floating_point() for p in model.parameters()):
        model.to(torch.float32)  # the sums in float32, whatever the base's dtype

    load_adapter(model, adapter)
    dequantized = merged_model(model)
    tokenizer = Path(adapter) if _has_tokenizer(Path(adapter)) else find_tokenizer(base)
    save_pretrained(model, str(out), tokenizer=tokenizer, shard_size=shard_size, dtype=stored)
    note = (
        f"wrote {out}: {base} with {adapter} merged into its weights ({str(stored).removeprefix('torch.')})"
    )
    if dequantized:
        note += f"; {len(dequantized)} NF4 layers were dequantized to merge into them"
    return note
