"""Text generation: prefill + decode over a static KV cache, batched with left padding, streamed per row.

    iter_generate(model, tokenizer, prompts, ...)  yields `Delta(row, text, token_ids, finish_reason)` as tokens come
    generate(model, tokenizer, prompts, ...)       runs it to the end; returns one `Completion` per prompt

How a call runs:
1. Prompts (text or token ids) are left-padded into (B, L); the padding is masked in the cache (`cache.valid`).
2. The prompts fill the cache in chunks (`prefill_spans`): each chunk is one forward whose queries attend to the
   cache positions written so far (a view of them, through the prefill attention plan), so the memory a prefill
   needs beyond the cache grows with the chunk, not with the prompt's square; only the last position's logits
   are computed, and they give the first token.
3. Each decode step feeds one token per row at `cache_position` L + i. Shapes never change, so on CUDA the step is
   compiled once (`mode="reduce-overhead"`: a CUDA graph) and replayed; the cache is allocated once per
   (model, batch, length bucket) and kept for the next call.
4. Sampling (repetition penalty → temperature → top-k → top-p → min-p, Gumbel-max draw) stays on the device: no
   host sync. The host looks at new tokens every `check_every` steps to stream text, end rows at EOS or a stop
   string, and stop early when every row has ended. It copies them out before queueing the next step and waits
   for that copy only, so the GPU decodes on while the host turns tokens into text (when every row has ended,
   the one step queued after them is discarded).

A request longer than `config.max_seq_len` (prompt + max_new_tokens) is refused; ALiBi/RoPE models run past their
trained length when loaded with a larger `max_seq_len`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from smalto.errors import ConfigError, UserError
from smalto.kernels import DecodeOptions, decode_attention, decode_linear, select
from smalto.kernels.decode_block import decode_blocks
from smalto.model.attention import SDPA_BIAS_BUDGET
from smalto.model.cache import KVCache
from smalto.model.mpt import MPTForCausalLM
from smalto.quant.linear import quant_head
from smalto.sampling import SamplingParams, sample

CACHE_BUCKET = 256  # compiled decode graphs are reused across calls whose length rounds up to the same bucket
PREFILL_CHUNK = 2048  # prompt tokens per prefill forward, at most
MIN_PREFILL_CHUNK = (
    128  # the scores' budget shortens chunks to no fewer tokens (SDPA then splits its queries)
)


@dataclass
class Delta:
    """What one row produced since the last delta. `finish_reason` is set on the row's last delta."""

    row: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "eos" | "stop" | "length"


@dataclass
class Completion:
    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


# ---------------------------------------------------------------- the decoder: cache + (compiled) step


class Decoder:
    """A KV cache of fixed (batch, length) and the decode step over it, compiled on CUDA when asked.

    The attention plans of prefill and decode are chosen here, once (they depend on the batch and the cache
    length); a compiled step on CUDA also runs the decode kernels (smalto/kernels/: fused decode blocks, the
    decode-linear unembedding) with `options`."""

    def __init__(
        self,
        model: MPTForCausalLM,
        batch: int,
        max_len: int,
        compile: bool,
        options: DecodeOptions | None = None,
    ):
        self.model, self.batch, self.max_len, self.want_compile = model, batch, max_len, compile
        self.asked = options
        self.cache = KVCache.for_model(model.config, batch, max_len, model.dtype, model.device)
        kernels = compile and model.device.type == "cuda"
        self.options = (options or DecodeOptions()) if kernels else None
        if kernels:  # the Triton decode kernels: built before tracing
            decode_attention.prepare()
            decode_linear.prepare()
        shape = dict(device=model.device, dtype=model.dtype, batch=batch, seq=max_len, options=self.options)
        self.prefill_plan = select(model.config, "prefill", **shape)  # type: ignore[arg-type]
        self.decode_plan = select(model.config, "decode", **shape)  # type: ignore[arg-type]
        self.blocks = decode_blocks(model, self.options)
        self.max_rows = self.options.linear_rows if self.options is not None else 0
        self.quant_head = quant_head(model)
        self.step_fn: Callable[[Tensor, Tensor], Tensor] = self._step
        self.compiled = False
        if compile:
            for t in self.cache.tensors():  # fixed addresses: CUDA graphs read them in place
                torch._dynamo.mark_static_address(t)
            self.step_fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.compiled = True

    def _logits(self, h: Tensor) -> Tensor:
        """h (B, d_model) → float logits (B, V); the decode-linear kernel for a few rows."""
        m = self.model
        if self.quant_head is not None:  # --quantize-head: the quantized linear path reads the packed matrix
            return m.scale_logits(self.quant_head.logits(h)).float()
        return m.scale_logits(
            decode_linear.linear_or_matmul(h, m.unembedding, max_rows=self.max_rows)
        ).float()

    def _step(self, token: Tensor, pos: Tensor) -> Tensor:
        """token (B, 1), pos (1,) → float logits (B, V). The cache's host-side length is not touched here."""
        tr = self.model.transformer
        x, inputs = tr.embed(token, None, None, self.cache, pos, self.decode_plan)
        for block in self.blocks:
            x = block(x, inputs, self.cache)
        return self._logits(tr.norm_f(x)[:, -1])

    def prefill(self, ids: Tensor, mask: Tensor, chunk: int = PREFILL_CHUNK) -> Tensor:
        """ids, mask (B, L) → float logits of the last position (B, V), the prompts written into the cache in
        chunks of at most `chunk` tokens (`prefill_spans`)."""
        self.cache.reset()
        B, L = ids.shape
        per_key = B * self.model.config.n_heads
        for start, end, n_keys in prefill_spans(L, chunk, self.cache.max_len, per_key):
            view = self.cache.view(n_keys, start)
            h = self.model.transformer(
                ids[:, start:end], mask[:, start:end], None, view, None, self.prefill_plan
            )
        self.cache.length = L
        return self._logits(h[:, -1])

    def step(self, token: Tensor, pos: Tensor) -> Tensor:
        if not self.compiled:
            return self.step_fn(token, pos)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.step_fn(token, pos)
        except Exception as e:  # a compile failure must not cost the user the answer; it is reported
            warnings.warn(f"compiled decode failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=2)
            self.step_fn, self.compiled = self._step, False
            return self._step(token, pos)


def prefill_spans(length: int, chunk: int, max_len: int, per_key: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, n_keys) of each prefill forward over a `length`-token prompt: at most `chunk` tokens, and fewer
    (down to MIN_PREFILL_CHUNK) where the chunk's attention scores against its keys, `per_key` (rows × heads) ·
    tokens · n_keys elements, would exceed SDPA_BIAS_BUDGET: then SDPA's bias is built once per forward for all
    layers, not once per layer in slices. n_keys: the positions written so far, rounded up to a multiple of 16
    (SDPA's fused kernels want aligned biases; the causal mask hides the unwritten ones) within the cache."""
    start = 0
    while start < length:
        n = min(chunk, length - start)
        fit = SDPA_BIAS_BUDGET // (per_key * _keys(start + n, max_len))
        end = start + min(n, max(fit, MIN_PREFILL_CHUNK))
        yield start, end, _keys(end, max_len)
        start = end


def _keys(end: int, max_len: int) -> int:
    return min(-(-end // 16) * 16, max_len)


def get_decoder(
    model: MPTForCausalLM, batch: int, length: int, compile: bool, options: DecodeOptions | None = None
) -> Decoder:
    """Reuse the model's last decoder when batch, length bucket and options match (keeps compiled graphs warm)."""
    size = -(-length // CACHE_BUCKET) * CACHE_BUCKET if compile else length
    dec = model.__dict__.pop("_smalto_decoder", None)
    key = (batch, size, compile, model.dtype, model.device, options)
    if (
        dec is None
        or (dec.batch, dec.max_len, dec.want_compile, dec.cache.dtype, dec.cache.device, dec.asked) != key
    ):
        dec = None  # drop the old cache before allocating the new one
        dec = Decoder(model, batch, size, compile, options)
    model.__dict__["_smalto_decoder"] = dec  # a plain attribute, not a submodule: no state_dict entry
    return dec


# ---------------------------------------------------------------- host-side row state


@dataclass
class _Row:
    prompt_len: int
    anchor: list[int] = field(default_factory=list)  # the prompt's last token: see `_completion_text`
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish: str | None = None


def _completion_text(tokenizer: Any, anchor: list[int], ids: list[int]) -> str:
    """The text of `ids` as it continues the prompt. SentencePiece-style tokenizers (LLaMA's) drop the leading
    space of a decoded sequence, so the completion is decoded after the prompt's last token and that token's own
    text is cut off: " Paris", not "Paris". Where that is not a prefix (a prompt ending inside a UTF-8 character),
    the completion is decoded alone."""
    if anchor:
        head = tokenizer.decode(anchor, skip_special_tokens=False)
        both = tokenizer.decode(anchor + ids, skip_special_tokens=False)
        if both.startswith(head):
            return both[len(head) :]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters not to stream yet: a partial UTF-8 character or the start of a stop string."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def default_eos(model: MPTForCausalLM, tokenizer: Any) -> list[int]:
    """Where generation stops by default: the model's `eos_token_ids` (the folder's generation_config.json, as
    transformers' generate), else the tokenizer's EOS, else nowhere."""
    ids = getattr(model, "eos_token_ids", ())
    if ids:
        return list(ids)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return [int(eos)] if isinstance(eos, int) else []


def encode_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise UserError("text prompts need a tokenizer; pass one or give token id lists")
            ids = list(tokenizer.encode(p))
        else:
            ids = [int(t) for t in p]
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
            if bos is None:
                raise UserError("an empty prompt needs a tokenizer with a BOS token; give at least one token")
            ids = [bos]
        out.append(ids)
    return out


def check_length(model: MPTForCausalLM, prompt_len: int, max_new_tokens: int) -> None:
    c = model.config
    total = prompt_len + max_new_tokens
    if total <= c.max_seq_len:
        return
    how = (
        (
            "load the model with a larger max_seq_len (e.g. smalto.load(path, max_seq_len=...) or --max-seq-len); "
            "ALiBi and RoPE models can run past their trained length"
        )
        if not c.uses_wpe
        else "this model has learned positions and cannot run past them"
    )
    raise UserError(
        f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
        f"max_seq_len ({c.max_seq_len}); shorten the request or {how}"
    )


def fit_new_tokens(model: MPTForCausalLM, prompt_len: int, max_new_tokens: int) -> tuple[int, str | None]:
    """`max_new_tokens` clipped so that the prompt and the completion fit the context, and a note saying so (None
    when nothing was clipped). A prompt that fills the context alone is left to `check_length` to refuse."""
    c = model.config
    room = c.max_seq_len - prompt_len
    if max_new_tokens <= room or room < 1:
        return max_new_tokens, None
    return room, (
        f"max new tokens {max_new_tokens} clipped to {room}: the model's context is {c.max_seq_len} tokens and "
        f"the prompt takes {prompt_len}"
        + ("" if c.uses_wpe else " (--max-seq-len raises the context of ALiBi/RoPE models)")
    )


@torch.inference_mode()
def iter_generate(
    model: MPTForCausalLM,
    tokenizer: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    compile: bool | None = None,
    check_every: int | None = None,
    options: DecodeOptions | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> Iterator[Delta]:
    """Generate for every prompt at once, yielding `Delta`s as text becomes final (see the module docstring).

    eos_token_id defaults to the model's `eos_token_ids` (its folder's generation_config.json), else the
    tokenizer's EOS (an empty list: none, generate max_new_tokens).
    compile: None = on CUDA only. check_every: host checks every N steps (default 1 on CPU, 8 on CUDA).
    options: how a compiled CUDA step uses the decode kernels (default `DecodeOptions()`).
    prefill_chunk: prompt tokens per prefill forward, at most (see `prefill_spans`).
    """
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty
    )
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens} must be >= 1")
    if prefill_chunk < 1:
        raise ConfigError(f"prefill_chunk = {prefill_chunk} must be >= 1")
    stops = [s for s in (stop or []) if s]
    if stops and tokenizer is None:
        raise UserError("stop strings need a tokenizer to turn tokens into text")
    if isinstance(prompts, str):
        prompts = [prompts]
    rows_ids = encode_prompts(tokenizer, prompts)
    if eos_token_id is None:
        eos_token_id = default_eos(model, tokenizer)
    eos = (
        set()
        if eos_token_id is None
        else ({int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    )

    device = model.device
    B, L = len(rows_ids), max(len(r) for r in rows_ids)
    check_length(model, L, max_new_tokens)
    compile = device.type == "cuda" if compile is None else compile
    every = check_every or (8 if device.type == "cuda" else 1)
    dec = get_decoder(model, B, L + max_new_tokens, compile, options)

    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    full_mask = torch.zeros(B, dec.max_len, dtype=torch.bool, device=device)
    for r, row in enumerate(rows_ids):  # left padding
        ids[r, L - len(row) :] = torch.tensor(row, device=device)
        full_mask[r, L - len(row) :] = True
    full_mask[:, L:] = True
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        real = torch.where(full_mask[:, :L], ids, ids[:, -1:])  # pads point at a real token of their row
        seen.scatter_(1, real, True)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    out = torch.empty(max_new_tokens, B, dtype=torch.long, device=device)  # step-major: a check's tokens are
    cuda = device.type == "cuda"  # contiguous, so that the copy to pinned host memory is a plain async memcpy
    host = torch.empty(max_new_tokens, B, dtype=torch.long, pin_memory=cuda)
    rows = [_Row(prompt_len=len(r), anchor=r[-1:]) for r in rows_ids]
    logits = dec.prefill(ids, full_mask[:, :L], prefill_chunk)
    synced = 0
    for i in range(max_new_tokens):
        token = sample(logits, params, seen, gen)
        out[i] = token
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        last = i == max_new_tokens - 1
        check = (i + 1 - synced) >= every or last
        if check:  # copy the new tokens out before the next step is queued, so that reading them waits for
            # them alone: the GPU runs step i + 1 while the host decodes text (no drained queue per check)
            host[synced : i + 1].copy_(out[synced : i + 1], non_blocking=cuda)
            ready = torch.cuda.Event() if cuda else None
            if ready is not None:
                ready.record(torch.cuda.current_stream(device))  # the model's device, not the current one
        if not last:
            pos = torch.full((1,), L + i, dtype=torch.long, device=device)
            logits = dec.step(token[:, None], pos)
        if check:
            if ready is not None:
                ready.synchronize()  # the one host sync, every `every` steps
            new = host[synced : i + 1].T.tolist()
            synced = i + 1
            yield from _advance(rows, new, tokenizer, eos, stops, last)
            if all(r.finish for r in rows):
                break
    dec.cache.length = 0


def _advance(
    rows: list[_Row], new: list[list[int]], tokenizer: Any, eos: set[int], stops: list[str], last: bool
) -> Iterator[Delta]:
    """Take each row's new tokens in order; yield what became final text; end rows at EOS, stop, or length."""
    for r, (row, toks) in enumerate(zip(rows, new, strict=True)):
        if row.finish:
            continue
        added: list[int] = []
        for t in toks:
            if t in eos:
                row.finish = "eos"
                break
            row.ids.append(t)
            added.append(t)
            if tokenizer is not None:
                row.text = _completion_text(tokenizer, row.anchor, row.ids)
                hits = [row.text.find(s, max(0, row.emitted - len(s))) for s in stops]
                hits = [h for h in hits if h >= 0]
                if hits:
                    row.text, row.finish = row.text[: min(hits)], "stop"
                    break
        if row.finish is None and last:
            row.finish = "length"
        end = len(row.text) if row.finish else len(row.text) - _holdback(row.text, stops)
        text, row.emitted = row.text[row.emitted : end], max(row.emitted, end)
        if text or added or row.finish:
            yield Delta(row=r, text=text, token_ids=added, finish_reason=row.finish)


def generate(
    model: MPTForCausalLM,
    tokenizer: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    callback: Callable[[Delta], None] | None = None,
    **kwargs: Any,
) -> list[Completion]:
    """Run `iter_generate` to the end (same keyword arguments); `callback` sees every `Delta` as it comes."""
    if isinstance(prompts, str):
        prompts = [prompts]
    n_prompt = [len(p) for p in encode_prompts(tokenizer, prompts)]
    texts = [""] * len(prompts)
    ids: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for d in iter_generate(model, tokenizer, prompts, **kwargs):
        texts[d.row] += d.text
        ids[d.row] += d.token_ids
        if d.finish_reason:
            reasons[d.row] = d.finish_reason
        if callback is not None:
            callback(d)
    return [
        Completion(
            text=texts[i] if tokenizer is not None else None,
            token_ids=ids[i],
            finish_reason=reasons[i],
            prompt_tokens=n_prompt[i],
        )
        for i in range(len(prompts))
    ]
