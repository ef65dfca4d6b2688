"""Adapters applied to a plain model from outside: LoRA (low-rank updates of frozen linears) and their files.

    lora.py     LoraConfig, the `LoRA` pair (A, B) and `apply_lora` (targets matched by HF module names, as PEFT
                matches them), adapters on/off (`adapters_disabled`), merge / unmerge
    peft.py     PEFT's adapter folder (adapter_config.json + adapter_model.safetensors) both ways
    nf4.py      NF4 storage of the frozen base linears (QLoRA), when present
The model stays plain: `apply_lora` gives each targeted layer (an `nn.Linear`, or any layer with `in_features` and
`out_features`, such as an NF4 one) LoRA children and a subclass of its own class whose forward adds them; the
base parameters keep their names, so checkpoints, the HF export and FSDP see the model they know.
"""

from smalto.adapters.lora import LoRA, LoraConfig, adapters_disabled, apply_lora, lora_layers, merge, unmerge

__all__ = ["LoRA", "LoraConfig", "adapters_disabled", "apply_lora", "lora_layers", "merge", "unmerge"]
