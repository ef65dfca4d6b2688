"""The MPT model: config, attention kernels, layers, KV cache and the causal LM."""

from smalto.model.cache import KVCache
from smalto.model.config import MPTConfig
from smalto.model.mpt import CausalLMOutput, MPTForCausalLM, build_model

__all__ = ["CausalLMOutput", "KVCache", "MPTConfig", "MPTForCausalLM", "build_model"]
