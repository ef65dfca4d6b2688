"""Save an `MPTForCausalLM` as a Hugging Face folder: a native LLaMA one for a model with the LLaMA options, else MPT.

What the folder holds:
    config.json             our config + model_type, architectures, auto_map, torch_dtype, layer_norm_epsilon
    generation_config.json  use_cache and the tokenizer's bos/eos/pad ids when known
    model.safetensors       or model-0000N-of-0000M.safetensors + model.safetensors.index.json above `shard_size`
                            (pytorch_model*.bin + index with safe_serialization=False)
    configuration_mpt.py, modeling_mpt.py   self-contained code for `trust_remote_code=True`
    tokenizer files         when a tokenizer (object or folder) is given

How transformers loads it (see docs/hf.md): when the config is one transformers' native `MptForCausalLM` computes
exactly, model_type is `mpt` and the folder loads with or without `trust_remote_code`. Otherwise model_type is
`smalto_mpt`: native loading fails with transformers' "unrecognized model type / needs trust_remote_code" error
instead of silently computing another model (the native class ignores qk_ln, GQA, RoPE, expansion_ratio, ...).

A model with the LLaMA options (RoPE, RMSNorm, a gated FFN, no MPT-only feature; `llama_incompatibilities`) is
written as `model_type: llama` (`mistral` with a sliding window) with LLaMA's tensor names (smalto/hf/llama.py):
transformers loads it as LlamaForCausalLM, and no remote code is written.

The folder is written to a temporary sibling and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smalto.errors import ConfigError
from smalto.hf.llama import llama_config_dict, llama_incompatibilities, tensors_to_llama
from smalto.hf.load import parse_dtype
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from smalto.sizes import SIZE_UNITS, parse_size  # noqa: F401 (re-exported)

REMOTE_DIR = Path(__file__).resolve().parent.parent / "hf_remote"
REMOTE_FILES = ("configuration_mpt.py", "modeling_mpt.py")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def native_incompatibilities(config: MPTConfig) -> list[str]:
    """Why transformers' native `MptForCausalLM` would compute something else for this config ([] if it would not).

    The native class hard-codes: ALiBi with bias max 8, multi-head attention, a 4× GELU MLP, LayerNorm without
    bias, no biases in linears, a tied unembedding, no logit scale. It honours clip_qkv and softmax_scale.
    """
    a, f = config.attn_config, config.ffn_config
    act = f.ffn_act_fn or {"name": "gelu"}
    checks = {
        "alibi is off": not a.alibi,
        f"alibi_bias_max is {a.alibi_bias_max}, not 8": a.alibi and a.alibi_bias_max != 8,
        "rope": a.rope,
        "qk_ln": a.qk_ln,
        "qk_gn": a.qk_gn,
        f"kv_n_heads {config.kv_n_heads} != n_heads": config.kv_n_heads != config.n_heads,
        f"sliding_window_size {a.sliding_window_size}": a.sliding_window_size != -1,
        f"ffn_type {f.ffn_type}": f.ffn_type != "mptmlp",
        f"ffn_act_fn {act}": act.get("name", "gelu") != "gelu" or act.get("approximate", "none") != "none",
        f"ffn_hidden_size {config.ffn_hidden_size} != 4 * d_model": config.ffn_hidden_size
        != 4 * config.d_model,
        f"norm_type {config.norm_type}": config.norm_type not in ("layernorm", "low_precision_layernorm"),
        "biases (no_bias: false)": not config.no_bias,
        "untied lm_head": not config.tie_word_embeddings,
        f"logit_scale {config.logit_scale}": config.logit_scale is not None,
    }
    return [why for why, bad in checks.items() if bad]


def hf_config_dict(
    config: MPTConfig, dtype: torch.dtype, *, token_ids: dict[str, int | None] | None = None
) -> dict:
    """The config.json for `config` (see the module docstring for model_type / auto_map)."""
    from smalto.version import __version__

    why_not = native_incompatibilities(config)
    native = not why_not
    remote_lacks = _remote_code_lacks(config)
    if remote_lacks:
        raise ConfigError(
            f"this model has no Hugging Face form: it is not a LLaMA ({', '.join(llama_incompatibilities(config))}) "
            f"and the MPT remote code does not compute {', '.join(remote_lacks)}"
        )
    d = config.to_dict()
    for key in ("rope_scaling", "head_dim", "bias"):  # the LLaMA-only fields, unset here
        d["attn_config"].pop(key, None)
    d["expansion_ratio"] = _int_if_integral(d["expansion_ratio"])
    d["attn_config"]["attn_pdrop"] = _int_if_integral(
        d["attn_config"]["attn_pdrop"]
    )  # native 5.x types it int
    d["init_device"] = "cpu"
    suffix = "" if native else "Smalto"
    d.update(
        model_type="mpt" if native else "smalto_mpt",
        architectures=["MPTForCausalLM"],
        auto_map={
            "AutoConfig": f"configuration_mpt.{suffix}MPTConfig",
            "AutoModelForCausalLM": f"modeling_mpt.{suffix}MPTForCausalLM",
        },
        torch_dtype=str(dtype).removeprefix("torch."),
        layer_norm_epsilon=config.norm_eps,
        use_cache=False,
        transformers_version=_transformers_version(),
        smalto={"version": __version__, "native_transformers": native, "why_not_native": why_not},
    )
    for key, value in (token_ids or {}).items():
        if value is not None:
            d[key] = value
    return d


def llama_hf_config(config: MPTConfig, dtype: torch.dtype, token_ids: dict[str, int | None]) -> dict:
    """The config.json of a model with the LLaMA options: a native LlamaConfig / MistralConfig."""
    from smalto.version import __version__

    d = llama_config_dict(config)
    d.update(
        torch_dtype=str(dtype).removeprefix("torch."),
        transformers_version=_transformers_version(),
        smalto_version=__version__,
    )
    d.update({k: v for k, v in token_ids.items() if v is not None})
    return d


def save_pretrained(
    model: MPTForCausalLM,
    path: str | Path,
    *,
    tokenizer: Any = None,
    shard_size: str | int = "5GB",
    dtype: str | torch.dtype | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Write `model` as an HF folder at `path` (replacing what a previous save wrote there); returns the path.

    tokenizer: a transformers tokenizer, or a folder / tokenizer.json whose tokenizer files are copied.
    dtype: cast the weights while writing (default: the model's dtype); one shard's worth is cast at a time.
    """
    dest = Path(path)
    target = parse_dtype(dtype) or model.dtype
    limit = parse_size(shard_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    llama = not llama_incompatibilities(model.config)
    try:
        token_ids = _write_tokenizer(tokenizer, tmp) if tokenizer is not None else {}
        state = dict(model.state_dict(keep_vars=True))
        if llama:
            state = tensors_to_llama(state, model.config)
        _write_weights(state, tmp, target, limit, safe_serialization)
        config = (
            llama_hf_config(model.config, target, token_ids)
            if llama
            else hf_config_dict(model.config, target, token_ids=token_ids)
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = {
            "use_cache": True,
            **generation_ids(model, token_ids),
            "transformers_version": config["transformers_version"],
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name in REMOTE_FILES if not llama else ():
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_weights(
    state: dict[str, Tensor], folder: Path, dtype: torch.dtype, limit: int, safe: bool
) -> None:
    # a tied model stores the embedding once (no lm_head.weight), as mosaicml/mpt-* do
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * dtype.itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    names = (
        [f"{stem}.{ext}"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for file, keys in zip(names, shards, strict=True):
        part = {k: _cast(state[k], dtype) for k in keys}  # one shard's worth of copies at a time
        if safe:
            from safetensors.torch import save_file

            save_file(part, str(folder / file), metadata={"format": "pt"})
            _usual_mode(folder / file)
        else:
            torch.save(part, folder / file)
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(keys, file))
        del part
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _usual_mode(path: Path) -> None:
    """safetensors creates its files private (0600); give them the mode of every other file written (0644
    under the usual umask), so that a folder shared with a group or a server is readable as a whole."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    if t.is_floating_point():
        t = t.to(dtype)
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():  # a view (q of Wqkv): its own storage
        return t.to("cpu").contiguous().clone()
    return (
        t.to("cpu").contiguous().clone()
        if t.device.type != "cpu" or not t.is_contiguous()
        else t.contiguous()
    )


def write_tokenizer(tokenizer: Any, folder: Path) -> dict[str, int | None]:
    """The tokenizer files (from a tokenizer object, a folder or a tokenizer.json) into `folder`; its special ids."""
    return _write_tokenizer(tokenizer, folder)


def _write_tokenizer(tokenizer: Any, folder: Path) -> dict[str, int | None]:
    """Write the tokenizer files; return its bos/eos/pad ids for config.json and generation_config.json."""
    from smalto.tokenizer import load_tokenizer

    if isinstance(tokenizer, str | Path):
        src = Path(tokenizer)
        files = [src] if src.is_file() else [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
        for f in files:
            shutil.copyfile(
                f, folder / ("tokenizer.json" if f.suffix == ".json" and src.is_file() else f.name)
            )
        tokenizer = load_tokenizer(src)
    else:
        tokenizer.save_pretrained(str(folder))
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename tmp → dest; an existing dest keeps its other files (README, ...) but loses our stale weights."""
    if not dest.exists():
        tmp.rename(dest)
        return
    if not dest.is_dir():
        raise ConfigError(f"{dest} exists and is not a folder")
    for f in dest.iterdir():
        if not (tmp / f.name).exists() and not WEIGHT_FILE.match(f.name) and f.is_file():
            shutil.copy2(f, tmp / f.name)
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _remote_code_lacks(config: MPTConfig) -> list[str]:
    """The fields of `config` that smalto/hf_remote's MPT code does not compute (they come with LLaMA)."""
    a = config.attn_config
    checks = {
        f"attn_config.rope_scaling {a.rope_scaling}": a.rope_scaling is not None,
        f"attn_config.head_dim {a.head_dim}": a.head_dim not in (None, config.d_model // config.n_heads),
        f"attn_config.bias {a.bias}": a.bias not in (None, not config.no_bias),
        f"ffn_config.bias {config.ffn_config.bias}": config.ffn_config.bias not in (None, not config.no_bias),
    }
    return [why for why, bad in checks.items() if bad]


def _int_if_integral(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _transformers_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return None


def generation_ids(model: MPTForCausalLM, token_ids: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json's token ids: the tokenizer's bos / eos / pad, with the model's own stop ids
    (`eos_token_ids`, from the folder it was loaded from: LLaMA-3's end of turn beside its end of text) kept."""
    out = {k: v for k, v in token_ids.items() if v is not None}
    eos = list(getattr(model, "eos_token_ids", ()))
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out
