"""The model side of evaluation: log-likelihoods of continuations and greedy generation, batched.

Two ways to score, one answer (tests hold both to a plain full-sequence computation):
  prefix  (smalto MPT models) requests that share a context — the choices of a multiple-choice item — run the
          context once: a left-padded prefill into a KV cache, the cache rows repeated per choice, then every
          choice's tokens in one batched forward over that cache. A 4-choice item with a long few-shot prompt
          costs about one prompt instead of four.
  full    (any transformers causal LM, and MPT batches too long for the prefix layout) each context+continuation
          as one right-padded row.
Only the positions that predict continuation tokens are unembedded, so a 50k vocabulary never makes a
(batch, seq, vocab) tensor on the MPT paths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smalto.eval.prompts import Request
from smalto.eval.scoring import Score


def is_smalto(model: Any) -> bool:
    from smalto.model.mpt import MPTForCausalLM

    return isinstance(model, MPTForCausalLM)


def model_max_len(model: Any) -> int:
    cfg = model.config
    for key in ("max_seq_len", "max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: list[list[int]], pad_id: int, left: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids, mask) with rows padded to the longest, on the left or the right."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = True
    return ids.to(device), mask.to(device)


def _scores(logprobs: Tensor, targets: list[list[int]]) -> list[Score]:
    """logprobs (R, C, V) float: row r's position j predicts targets[r][j]."""
    out = []
    for r, tgt in enumerate(targets):
        lp = logprobs[r, : len(tgt)]
        t = torch.tensor(tgt, device=lp.device)
        total = lp.gather(-1, t[:, None]).sum()
        greedy = bool((lp.argmax(-1) == t).all())
        out.append(Score(logprob=float(total), n_tokens=len(tgt), greedy=greedy))
    return out


@torch.no_grad()
def score_full(model: Any, requests: list[Request], pad_id: int) -> list[Score]:
    """One right-padded row per request."""
    device = _device(model)
    rows = [r.context + r.continuation[:-1] for r in requests]  # the last token is predicted, never read
    ids, mask = _pad(rows, pad_id, left=False, device=device)
    C = max(len(r.continuation) for r in requests)
    # position of the token that predicts continuation token j of row r: len(context) - 1 + j
    pos = (
        torch.stack([torch.arange(C) + len(r.context) - 1 for r in requests])
        .clamp(max=ids.shape[1] - 1)
        .to(device)
    )
    if is_smalto(model):
        h = model.transformer(ids, mask if not bool(mask.all()) else None)
        h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
        logits = model.unembed(h)
    else:
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
        logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    return _scores(logits.float().log_softmax(-1), [r.continuation for r in requests])


@torch.no_grad()
def score_prefix(
    model: Any, contexts: list[list[int]], conts: list[list[int]], group: list[int], pad_id: int
) -> list[Score]:
    """Requests (conts[i] after contexts[group[i]]): every context runs once, its choices share its KV cache."""
    from smalto.model.cache import KVCache

    device = _device(model)
    ctx_ids, ctx_mask = _pad(contexts, pad_id, left=True, device=device)
    G, L = ctx_ids.shape
    C = max(len(c) for c in conts)
    cache = KVCache.for_model(model.config, G, L + C - 1, model.dtype, device)
    h = model.transformer(ctx_ids, ctx_mask, None, cache, torch.arange(L, device=device))
    first = model.unembed(h[:, -1])  # (G, V): predicts every choice's first token

    idx = torch.tensor(group, device=device)
    logits = first.index_select(0, idx)[:, None]
    if C > 1:  # the choices' tokens but their last (predicted, never read), over each row's copy of the cache
        cache.length = L
        rows = cache.select_rows(idx)
        cont_ids, cont_mask = _pad([c[:-1] for c in conts], pad_id, left=False, device=device)
        h = model.transformer(cont_ids, cont_mask, None, rows, torch.arange(L, L + C - 1, device=device))
        logits = torch.cat([logits, model.unembed(h)], dim=1)  # position j predicts token j + 1
    return _scores(logits.float().log_softmax(-1), conts)


def plan_batches(requests: list[Request], batch_size: int) -> list[list[int]]:
    """Request indices per forward: requests sharing a context stay together, longest batches first (an
    out-of-memory shows at once, and similar lengths waste little padding)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(tuple(r.context), []).append(i)

    def length(g: list[int]) -> int:
        return len(requests[g[0]].context) + max(len(requests[i].continuation) for i in g)

    ordered = sorted(groups.values(), key=length, reverse=True)
    batches: list[list[int]] = []
    for g in ordered:
        if batches and len(batches[-1]) + len(g) <= batch_size:
            batches[-1].extend(g)
        else:
            batches.append(list(g))
    return batches


def score_batch(model: Any, requests: list[Request], pad_id: int, max_len: int) -> list[Score]:
    if not is_smalto(model):
        return score_full(model, requests, pad_id)
    contexts: list[list[int]] = []
    where: dict[tuple[int, ...], int] = {}
    group = []
    for r in requests:
        key = tuple(r.context)
        if key not in where:
            where[key] = len(contexts)
            contexts.append(r.context)
        group.append(where[key])
    L = max(len(c) for c in contexts)
    C = max(len(r.continuation) for r in requests)
    if len(contexts) == len(requests) or L + C - 1 > max_len:
        # nothing shared (one forward beats prefill + continuation), or the padded layout runs past max_len
        return score_full(model, requests, pad_id)
    return score_prefix(model, contexts, [r.continuation for r in requests], group, pad_id)


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    contexts: list[list[int]],
    *,
    max_new_tokens: int,
    stop: list[str],
    pad_id: int,
    fixed_steps: bool = False,
) -> list[str]:
    """Greedy continuations of token contexts, stopped at EOS or any stop string (scoring cuts at the stop).

    smalto models use `smalto.generate`. The loop below serves transformers models (their own cache) and
    sharded smalto models, which need `fixed_steps`: every rank runs the same number of forwards."""
    if is_smalto(model) and not fixed_steps:  # smalto's decoder: static cache, compiled step on CUDA
        from smalto.generate import generate

        completions = generate(
            model, tokenizer, contexts, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop or None
        )
        return [decode_generation(tokenizer, c.token_ids) for c in completions]
    device = _device(model)
    ids, mask = _pad(contexts, pad_id, left=True, device=device)
    B, L = ids.shape
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    if is_smalto(model):
        from smalto.model.cache import KVCache

        cache: Any = KVCache.for_model(model.config, B, L + max_new_tokens, model.dtype, device)
        h = model.transformer(ids, mask, None, cache, torch.arange(L, device=device))
        logits = model.unembed(h[:, -1])
    else:
        kw = {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)} if _takes_position_ids(model) else {}
        res = model(input_ids=ids, attention_mask=mask.long(), use_cache=True, **kw)
        cache, logits = res.past_key_values, res.logits[:, -1]
    attn = mask.long()
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t == eos:
                done[b] = True
                continue
            out[b].append(t)
            if stop and any(s in tokenizer.decode(out[b][-24:]) for s in stop):
                done[b] = True
        if step == max_new_tokens - 1 or (all(done) and not fixed_steps):
            break
        tok = nxt[:, None]
        attn = torch.cat([attn, torch.ones_like(tok)], dim=1)
        if is_smalto(model):
            h = model.transformer(tok, attn, None, cache, torch.tensor([L + step], device=device))
            logits = model.unembed(h[:, -1])
        else:
            pos = (attn.cumsum(-1) - 1)[:, -1:]
            kw = {"position_ids": pos} if _takes_position_ids(model) else {}
            res = model(input_ids=tok, attention_mask=attn, past_key_values=cache, use_cache=True, **kw)
            cache, logits = res.past_key_values, res.logits[:, -1]
    return [decode_generation(tokenizer, o) for o in out]


def decode_generation(tokenizer: Any, ids: list[int]) -> str:
    """Generated tokens as text without special tokens, as llm-foundry decodes (`skip_special_tokens=True`)."""
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def _takes_position_ids(model: Any) -> bool:
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters
