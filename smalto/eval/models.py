"""Load what `smalto eval MODEL` evaluates: a smalto / HF MPT folder, or any local transformers causal LM.

The tokenizer is looked up first, so a folder without one fails before any weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smalto.errors import CheckpointError, ConfigError


def load_tokenizer(path: str | Path, where: str = "") -> Any:
    from transformers import AutoTokenizer

    p = Path(path)
    has_files = p.is_dir() and any(
        (p / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )
    if not has_files:
        raise CheckpointError(
            f"no tokenizer in {p}{where} (tokenizer.json / tokenizer_config.json); pass --tokenizer DIR with one, "
            "e.g. ../shared/tokenizers/gpt-neox-20b for MPT models"
        )
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise CheckpointError(f"cannot load the tokenizer in {p}: {e}") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device here; use --device cpu")
    return device


def load_model(
    path: str | Path, *, tokenizer: str | Path | None = None, device: str = "auto", dtype: str = "auto"
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer). MPT folders (model_type mpt / smalto_mpt) load as smalto models, anything
    else through transformers' AutoModelForCausalLM (local code only: no trust_remote_code)."""
    import torch

    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json; pass a smalto/Hugging Face model folder")
    tok = load_tokenizer(tokenizer or p, "" if tokenizer else " (the model folder)")
    dev = resolve_device(device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    else:
        found = getattr(torch, dtype, None)
        if not isinstance(found, torch.dtype):
            raise ConfigError(
                f"--dtype {dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16"
            )
        dt = found
    model_type = json.loads((p / "config.json").read_text()).get("model_type")
    if model_type in (
        "mpt",
        "smalto_mpt",
    ):  # smalto_mpt: an MPT with options transformers' MptForCausalLM lacks
        import smalto

        model = smalto.load(str(p), dtype=dt, device=dev)
    else:
        import transformers
        from transformers import AutoModelForCausalLM

        new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
        key = "dtype" if new else "torch_dtype"  # renamed in transformers 4.56
        model = AutoModelForCausalLM.from_pretrained(str(p), **{key: dt})
        model = model.to(dev)  # type: ignore[arg-type]
    model.eval()
    return model, tok
