"""A few sampled continuations at the end of a run (temperature + top-k, with the static KV cache)."""

from __future__ import annotations

import torch

from smalto.model.cache import KVCache


@torch.no_grad()
def sample(model, tokenizer: str, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.8,
           top_k: int = 50, seed: int = 0) -> list[str]:
    """Continue each prompt; returns prompt + continuation, decoded."""
    from smalto.data.tokenize import load_tokenizer

    tok, info = load_tokenizer(tokenizer)
    model.eval()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = list(tok.encode(prompt).ids) if hasattr(tok.encode(prompt), "ids") else list(tok.encode(prompt))
        ids = ids[-(model.config.max_seq_len - max_new_tokens):] or [info.eos_id]
        cache = KVCache.for_model(model.config, 1, len(ids) + max_new_tokens, model.dtype, model.device)
        x = torch.tensor([ids], device=model.device)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(x, past_key_values=cache).logits[0, -1].float() / temperature
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            probs = torch.softmax(logits.masked_fill(logits < kth, -float("inf")), -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            if nxt == info.eos_id:
                break
            new.append(nxt)
            x = torch.tensor([[nxt]], device=model.device)
        out.append(prompt + tok.decode(new))
    return out
