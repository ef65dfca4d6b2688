"""Data: raw text → MDS token shards (`tokenize`), shards → batches (`stream`), finetuning formats (`finetune`).

Submodules are imported explicitly (`from smalto.data.stream import build_loader`) so that `smalto data`
does not pay for torch, and the loader does not pay for tokenizers.
"""
