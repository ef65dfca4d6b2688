"""`smalto.load`: the one way a command (or a user) gets a model, from every format smalto reads.

    load                      path + overrides → MPTForCausalLM in eval mode
    find_tokenizer            the tokenizer that goes with a model path (its own files, or a training run's)
    load_model_and_tokenizer  what `smalto generate` / `chat` need: both, or a message saying what is missing
Import what you need from here with `from smalto.load import ...`: `smalto.load` itself is the function.
torch and transformers are imported inside the functions, so `import smalto` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from smalto.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

    from smalto.model.config import MPTConfig
    from smalto.model.mpt import MPTForCausalLM
    from smalto.quant import QuantSpec

FORMATS = (
    "an HF model folder (config.json + weights), a training run folder, "
    "its checkpoints/ folder or one step_* folder"
)


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    max_seq_len: int | None = None,
    attn_impl: str | None = None,
    quantize: str | QuantSpec | None = None,
    adapter: str | Path | None = None,
    **config_overrides: Any,
) -> MPTForCausalLM:
    """Load a model as an `MPTForCausalLM` in eval mode, with the attention plans for scoring and prefill that its
    `attn_impl` selects (smalto.kernels; a decoder chooses its decode plan itself).

    path, one of:
      - an HF folder: config.json (model_type `mpt` or `smalto_mpt`) with model.safetensors or pytorch_model.bin,
        single or sharded with its *.index.json (`smalto.hf.load_pretrained` reads it);
      - a smalto training run folder (its latest checkpoint), its `checkpoints/` folder (the one `latest` names),
        or one `step_*` checkpoint folder (DCP shards of any world size + model.json);
      - a PEFT LoRA adapter folder (adapter_config.json): its `base_model_name_or_path` with the adapter.
    adapter: a PEFT LoRA adapter folder added, unmerged, on top of the model (smalto.adapters, docs/lora.md).
    Overrides, honoured for every format:
      dtype: 'bf16' / 'bfloat16', 'fp16' / 'float16', 'fp32' / 'float32', a torch.dtype, or None / 'auto' to keep
        the stored one (an HF folder's torch_dtype; float32 for a training checkpoint).
      device: 'cpu' (None), 'cuda', 'cuda:N', 'mps', or 'auto' (cuda when available).
      max_seq_len, attn_impl, and any other `MPTConfig` field as a keyword (nested ones as a dict, e.g.
        attn_config={"clip_qkv": 6.0}): applied to the stored config before the model is built. They may change
        how the model computes (a longer context for ALiBi / RoPE, the attention kernel), not its tensors' shapes.
      quantize: 'int8', 'int4' or a `smalto.quant.QuantSpec`: the blocks' linear layers quantized as they are
        loaded (on the CPU, then layer by layer onto `device`). A folder written by `smalto convert --quantize`
        loads quantized without it (docs/quantize.md). 'nf4': the frozen 4-bit NormalFloat base of QLoRA
        (`smalto.adapters.nf4`, double-quantized scales), quantized layer by layer onto `device` the same way, in
        bf16 unless `dtype` says otherwise (docs/qlora.md).
    Raises a ConfigError for a bad dtype, device or override (an unknown key names it) and a CheckpointError for a
    path that is no model or weights that do not fit, before reading any weights where it can.
    """
    import torch

    from smalto.hf.load import parse_device, parse_dtype

    target = parse_dtype(dtype)
    dev = parse_device(device) if device is not None else torch.device("cpu")
    path, adapter = resolve_adapter(path, adapter)
    kind, folder = _locate(path)
    stored = _stored_config(kind, folder)
    config = _override(stored, path, max_seq_len=max_seq_len, attn_impl=attn_impl, overrides=config_overrides)
    from smalto.quant.folder import load_quantized, resolve

    nf4 = isinstance(quantize, str) and quantize == "nf4"
    stored_quant, quant = resolve(folder if kind == "hf" else None, None if nf4 else quantize, dev, path)
    if nf4:
        if stored_quant is not None:
            raise ConfigError(
                f"{path} is already quantized ({stored_quant.describe()}); NF4 needs its 16-bit source"
            )
        target = target or torch.bfloat16
    where = (
        torch.device("cpu") if quant is not None or nf4 else dev
    )  # quantized layer by layer onto dev below
    if stored_quant is not None:
        model = load_quantized(folder, config, stored_quant, target, dev)
    elif kind == "hf":
        from smalto.hf.load import load_pretrained

        model = load_pretrained(folder, dtype=target, device=where, config=config)
    else:
        model = _load_checkpoint(folder, config, where, target)
    if quant is not None:
        from smalto.quant import quantize as quantize_model

        quantize_model(model, quant, device=dev)
    if nf4:
        from smalto.adapters.nf4 import apply_nf4

        apply_nf4(model, device=dev)
    if adapter is not None:
        from smalto.adapters.peft import load_adapter

        load_adapter(model, adapter)
    if kind == "hf":
        model.eos_token_ids = generation_eos(folder)
    from smalto.kernels import apply_inference

    return apply_inference(model)  # the scoring and prefill attention plans its config asks for


def generation_eos(folder: Path) -> tuple[int, ...]:
    """The `eos_token_id` of the folder's generation_config.json (an id or a list of them), as transformers'
    generate stops at; () when there is none or it is unreadable (the tokenizer's EOS then)."""
    import json

    try:
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    return tuple(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))


def resolve_adapter(path: str | Path, adapter: str | Path | None) -> tuple[str | Path, str | Path | None]:
    """(base model, adapter): a PEFT adapter folder given as the model stands for its recorded base with itself."""
    from smalto.adapters.peft import CONFIG, is_adapter, read_adapter_config

    if adapter is not None and not is_adapter(adapter):
        raise CheckpointError(f"adapter {adapter} is not a PEFT adapter folder (no {CONFIG})")
    if adapter is not None or not is_adapter(path) or (Path(path) / "config.json").is_file():
        return path, adapter
    _, raw = read_adapter_config(path)
    base = raw.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise CheckpointError(
            f"{path} is a LoRA adapter whose base_model_name_or_path ({base!r}) is not a folder here; pass the "
            "base model with the adapter (smalto.load(BASE, adapter=...), or MODEL --adapter on the command line)"
        )
    return base, path


def model_config(path: str | Path) -> MPTConfig:
    """The config a model path holds (any format `load` reads), without reading its weights."""
    return _stored_config(*_locate(path))


def _locate(path: str | Path) -> tuple[str, Path]:
    """('hf', the folder) or ('checkpoint', the step folder a run / checkpoints/ / step_* path means)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path} does not exist; pass {FORMATS}")
    if (p / "config.json").is_file():
        return "hf", p
    from smalto.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(p) if p.is_dir() else None
    if ckpt is not None:
        return "checkpoint", ckpt
    if p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        raise CheckpointError(
            f"{path} holds weights but no config.json; add the config.json they were saved with"
        )
    raise CheckpointError(f"{path} is not a model folder smalto can read; pass {FORMATS}")


def _stored_config(kind: str, folder: Path) -> MPTConfig:
    if kind == "hf":
        from smalto.hf.load import read_config

        return read_config(folder)[0]
    import json

    from smalto.model.config import MPTConfig
    from smalto.train.checkpoint import MODEL

    file = folder / MODEL
    if not file.is_file():
        raise CheckpointError(
            f"{folder} is not a complete smalto training checkpoint (no {MODEL}); pass another step_* folder"
        )
    try:
        return MPTConfig.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{file} is not a model config smalto can read ({e})") from None


def _override(
    config: MPTConfig,
    source: str | Path,
    *,
    max_seq_len: int | None,
    attn_impl: str | None,
    overrides: dict[str, Any],
) -> MPTConfig:
    """The stored config with the caller's overrides applied; refuses unknown keys and shape changes."""
    changes = dict(overrides)
    if attn_impl is not None:
        from smalto.model.config import LEGACY_ATTN_IMPLS

        nested = changes.get("attn_config") or {}
        changes["attn_config"] = {**nested, "attn_impl": LEGACY_ATTN_IMPLS.get(attn_impl, attn_impl)}
    if max_seq_len is not None:
        changes["max_seq_len"] = max_seq_len
    if not changes:
        return config
    names = ", ".join(sorted(changes))
    try:
        new = config.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"cannot load {source} with the override(s) {names}: {e}") from None
    except TypeError as e:  # a nested config given as something other than a dict
        raise ConfigError(f"cannot load {source} with the override(s) {names}: {e}") from None
    from smalto.model.mpt import MPTForCausalLM

    before = {n: tuple(p.shape) for n, p in MPTForCausalLM(config, device="meta").named_parameters()}
    after = {n: tuple(p.shape) for n, p in MPTForCausalLM(new, device="meta").named_parameters()}
    changed = [
        f"{n} {before.get(n)} → {after.get(n)}" for n in {**before, **after} if before.get(n) != after.get(n)
    ]
    if changed:
        raise ConfigError(
            f"the override(s) {names} change the shape of {source}'s tensors ({'; '.join(changed[:4])}), so its "
            "weights do not fit; overrides may change how the model computes (e.g. max_seq_len for ALiBi / RoPE "
            "models, attn_impl), not its size (learned positions have one row per position)"
        )
    return new


def _load_checkpoint(
    folder: Path, config: MPTConfig, device: torch.device, dtype: torch.dtype | None
) -> MPTForCausalLM:
    """A DCP training checkpoint (any saved world size) read in one process into a plain model."""
    from torch.distributed.checkpoint import CheckpointException

    from smalto.model.mpt import MPTForCausalLM
    from smalto.train.dcp_read import dcp_cause, load_dcp

    model = MPTForCausalLM(config, device="meta")
    model.to_empty(device=device)
    state = {"model": model.state_dict()}
    try:
        load_dcp(
            state, folder
        )  # the restricted unpickler: a crafted folder raises a CheckpointError, runs nothing
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps missing or truncated shards in its own types
        raise CheckpointError(f"cannot read the weights of {folder} ({dcp_cause(e)})") from None
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _has_tokenizer(folder: Path) -> bool:
    from smalto.hf.save import TOKENIZER_FILES

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


def base_tokenizer_path(base: str) -> str:
    """The tokenizer of a recipe's base_model (see `find_tokenizer`), for a recipe that sets no `tokenizer:`."""
    tok = find_tokenizer(base)
    if tok is None:
        raise ConfigError(f"base_model {base} holds no tokenizer and records none; set tokenizer: PATH")
    return str(tok)


def load_model_and_tokenizer(
    model_path: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    max_seq_len: int | None = None,
    quantize: str | QuantSpec | None = None,
    adapter: str | Path | None = None,
) -> tuple[MPTForCausalLM, Any]:
    """What `smalto generate` / `chat` need: the model (`load`; on `device`, default cuda when available) and its
    tokenizer (from `tokenizer_path`, else the model folder, else a training run's recorded tokenizer)."""
    from smalto.hf.load import parse_device, parse_dtype
    from smalto.tokenizer import load_tokenizer

    parse_dtype(dtype)  # refuse a bad --dtype / --device before reading anything
    dev = parse_device(device)
    model_path, adapter = resolve_adapter(model_path, adapter)
    _locate(model_path)  # says why a path is no model, before asking for a tokenizer
    tok_src = Path(tokenizer_path) if tokenizer_path else None
    if tok_src is None and adapter is not None and _has_tokenizer(Path(adapter)):
        tok_src = Path(adapter)  # a finetuned adapter carries the tokenizer it was trained with
    tok_src = tok_src or find_tokenizer(model_path)
    if tok_src is None:
        raise CheckpointError(
            f"{model_path} holds no tokenizer files (and records no training tokenizer); "
            "pass --tokenizer (a folder or tokenizer.json)"
        )
    model = load(
        model_path, dtype=dtype, device=dev, max_seq_len=max_seq_len, quantize=quantize, adapter=adapter
    )
    return model, load_tokenizer(tok_src)
