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
        from smalto.tokenizer import quiet_length_warning

        return quiet_length_warning(AutoTokenizer.from_pretrained(str(p), local_files_only=True))
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        broken = next(
            (p / f for f in ("tokenizer.json", "tokenizer_config.json") if _unreadable_json(p / f)), p
        )
        raise CheckpointError(f"cannot load the tokenizer in {p}: {broken} is unreadable ({e})") from None


def _unreadable_json(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True
    return False


def resolve_device(device: str) -> str:
    """auto → cuda when available, else cpu; refuses unknown names and absent accelerators (`smalto.hf.parse_device`)."""
    from smalto.hf.load import parse_device

    try:
        return str(parse_device(device))
    except ConfigError as e:
        raise ConfigError(f"--device: {e}") from None


def resolve_dtype(dtype: str, device: str) -> Any:
    """auto → bfloat16 on GPU, float32 elsewhere; else float32/bfloat16/float16 or bf16/fp16/fp32."""
    import torch

    from smalto.hf.load import parse_dtype

    try:
        dt = parse_dtype(dtype)
    except ConfigError as e:
        raise ConfigError(f"--dtype: {e}") from None
    if dt is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return dt


SMALTO_MODEL_TYPES = ("mpt", "smalto_mpt", "llama", "mistral")
"""config.json model types `smalto.load` reads (smalto_mpt: an MPT with options transformers' MptForCausalLM lacks,
or quantized weights)."""


def load_model(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: Any = None,
    adapter: str | Path | None = None,
    max_seq_len: int | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer). Folders smalto computes (`SMALTO_MODEL_TYPES`: MPT, LLaMA, Mistral) load as
    smalto models (`max_seq_len` raises their context: ALiBi / RoPE), anything else through transformers'
    AutoModelForCausalLM (local code only: no trust_remote_code)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json; pass a smalto/Hugging Face model folder")
    tok = load_tokenizer(tokenizer or p, "" if tokenizer else " (the model folder)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if _unreadable_json(p / "config.json"):
        raise CheckpointError(f"{p / 'config.json'} is not valid JSON; re-export or re-download the model")
    raw = json.loads((p / "config.json").read_text())
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    model: Any
    if model_type in SMALTO_MODEL_TYPES:
        from smalto.load import load

        model = load(
            str(p), dtype=dt, device=dev, quantize=quantize, adapter=adapter, max_seq_len=max_seq_len
        )
    else:
        if adapter is not None:
            raise ConfigError(
                f"--adapter applies to the models smalto computes ({', '.join(SMALTO_MODEL_TYPES)}); {p} has "
                f"model_type {model_type!r} (transformers)"
            )
        if quantize is not None:
            raise ConfigError(
                f"--quantize applies to the models smalto computes ({', '.join(SMALTO_MODEL_TYPES)}); {p} has "
                f"model_type {model_type!r} (transformers)"
            )
        import transformers
        from transformers import AutoModelForCausalLM

        new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
        key = "dtype" if new else "torch_dtype"  # renamed in transformers 4.56
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, **{key: dt})
        except Exception as e:  # transformers raises many types for files it cannot use
            raise CheckpointError(
                f"transformers cannot load the model in {p} ({p / 'config.json'}: model_type {model_type!r}): "
                f"{type(e).__name__}: {e}"
            ) from None
        model = model.to(dev)  # type: ignore[arg-type]
    model.eval()
    return model, tok
