"""Hugging Face folders in and out: `load_pretrained`, `save_pretrained`, `convert`.

    load.py     config.json + safetensors / .bin shards → MPTForCausalLM (meta device, streamed, weights_only)
    save.py     MPTForCausalLM → config.json, shards + index, generation_config.json, remote code, tokenizer
    convert.py  `load_any` (HF folders and training checkpoints), `convert`, `find_tokenizer`
The remote code copied into saved folders lives in `smalto/hf_remote/` (it must never import smalto).
"""

from smalto.hf.convert import convert, find_tokenizer, load_any, load_model_and_tokenizer
from smalto.hf.load import load_pretrained, parse_device, parse_dtype, read_config
from smalto.hf.save import hf_config_dict, native_incompatibilities, parse_size, save_pretrained

__all__ = [
    "convert",
    "find_tokenizer",
    "hf_config_dict",
    "load_any",
    "load_model_and_tokenizer",
    "load_pretrained",
    "native_incompatibilities",
    "parse_device",
    "parse_dtype",
    "parse_size",
    "read_config",
    "save_pretrained",
]
