"""Hugging Face folders in and out: `load_pretrained`, `save_pretrained` (= `smalto.save`).

    load.py     config.json + safetensors / .bin shards → MPTForCausalLM (meta device, streamed, weights_only)
    save.py     MPTForCausalLM → config.json, shards + index, generation_config.json, remote code, tokenizer
    llama.py    LLaMA / Mistral folders: config.json ↔ MPTConfig, HF tensor names ↔ ours (q/k/v ↔ Wqkv)
Commands get models through `smalto.load` (HF folders and training checkpoints, with overrides), which reads HF
folders with `load_pretrained`; this package imports nothing from `smalto.load`, `smalto.train` or `smalto.cli`.
The remote code copied into saved folders lives in `smalto/hf_remote/` (it must never import smalto).
"""

from smalto.hf.load import load_pretrained, parse_device, parse_dtype, read_config
from smalto.hf.save import hf_config_dict, native_incompatibilities, parse_size, save_pretrained

__all__ = [
    "hf_config_dict",
    "load_pretrained",
    "native_incompatibilities",
    "parse_device",
    "parse_dtype",
    "parse_size",
    "read_config",
    "save_pretrained",
]
