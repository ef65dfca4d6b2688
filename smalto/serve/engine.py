"""The continuous-batching engine: one thread drives the model; requests join and leave the batch at every step.

    engine = Engine(model, tokenizer, max_batch=8)
    engine.start(); engine.submit(request); ...; engine.shutdown()

A request is one sequence (the API turns `n` choices into n requests). Its life:
    waiting  in a bounded queue (`submit` refuses past `max_queue`: the server answers 429)
    prefill  it owns a slot of the cache (smalto/serve/slots.py); its prompt is written in chunks, at most
             `prefill_chunk` prompt tokens per step over all prefilling requests, so a long prompt never stalls
             the running ones for more than one chunk (the first chunks of several requests go in one packed
             forward, attention kept inside each); the last chunk's logits give the first token
    decode   every step runs one decode forward over all slots (reading each slot's first positions only, up to
             the smallest key-length bucket that holds the longest running sequence) and samples each running
             row with its own parameters (rows with the same parameters together; a seeded row with its own
             generator)
    done     at EOS, a stop token or string, max_tokens, or a cancel (client gone): its slot is free for the
             next step's admissions
Each step: drop cancelled requests → admit waiting ones into free slots → queue one budget of prefill chunks and
their first tokens' sampling → queue one decode step and its sampling on the device → take the prefill's first
tokens, then the previous decode step's tokens, on the host while the device runs this one. Sampled tokens feed
the next step on the device (a first token too, on CUDA), so the host's per-token work, text and stop strings,
overlaps the GPU instead of adding to every step, and nothing the host sends waits for the step in flight
(pinned, asynchronous copies). Results go to each request's `emit` callback (called on the engine thread) as
`Output`s.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from smalto.errors import UserError
from smalto.generate import default_eos
from smalto.kernels import DecodeOptions
from smalto.model.mpt import MPTForCausalLM
from smalto.sampling import SamplingParams, sample
from smalto.serve.metrics import Metrics
from smalto.serve.slots import MIN_BUCKET, SlotDecoder, to_device
from smalto.serve.text import TextStream


class QueueFull(UserError):
    """The waiting queue is at its bound: retry later (HTTP 429)."""


class Draining(UserError):
    """The server is shutting down and admits nothing new (HTTP 503)."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at that position, best first


@dataclass
class Output:
    """What one request produced since its last output. `finish_reason` ("stop" | "length" | "abort") is set on
    its last; `error` when the engine failed it. The EOS or stop token that ends a sequence is counted in
    `n_tokens` (usage counts it) but is not in `token_ids` or the text."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    n_tokens: int = 0  # tokens generated: `token_ids` and an EOS or stop token that ended the sequence
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


@dataclass
class Request:
    """One sequence to generate. `emit` is called on the engine thread; `cancel()` may be called from anywhere."""

    prompt: list[int]
    emit: Callable[[Output], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16  # 0: the prompt is only written (its logprobs, for echo), nothing generated
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: no logprobs
    prompt_logprobs: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Flight:
    """A decode step whose sampled tokens (and logprobs) are on their way to the host."""

    rows: list[_Seq]
    out: torch.Tensor  # (B,) the sampled tokens, on the device: the next step's input
    host: list[torch.Tensor]  # tokens, and for `want`: chosen logprobs, top values, top indices (host copies)
    ready: torch.cuda.Event | None
    want: list[_Seq]  # rows that asked for logprobs


@dataclass
class _Firsts:
    """First tokens sampled on the device after a prefill, on their way to the host."""

    seqs: list[_Seq]
    slots: torch.Tensor  # (N,) their slots, on the device
    tokens: torch.Tensor  # (N,) the tokens, on the device: fed to the decode step queued next
    host: torch.Tensor
    ready: torch.cuda.Event | None

    @classmethod
    def send(cls, pending: list[tuple[_Seq, torch.Tensor]], device: torch.device) -> _Firsts:
        tokens = torch.cat([t.view(1) for _, t in pending])
        cuda = device.type == "cuda"
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record(torch.cuda.current_stream(device))
        slots = to_device([s.slot for s, _ in pending], torch.long, device)
        return cls([s for s, _ in pending], slots, tokens, host, ready)

    def receive(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # the prefill and its sampling only: the decode queued after runs on
        return self.host.tolist()


@dataclass
class _Seq:
    req: Request
    slot: int
    text: TextStream | None
    written: int = 0  # prompt tokens in the cache
    next_token: int | None = None  # sampled on the host, not yet fed (else the next token is on the device)
    n_out: int = 0  # tokens taken (emitted) so far
    # tokens sampled so far (the last may still be on its way to the host): decoding when > 0
    sampled: int = 0
    done: bool = False
    gen: torch.Generator | None = None
    last_time: float = 0.0
    # the prompt's logprobs (echo with logprobs), gathered over its chunks; the first token has none
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])


class Engine:
    def __init__(
        self,
        model: MPTForCausalLM,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 256,
        prefill_chunk: int = 2048,
        compile: bool | None = None,
        options: DecodeOptions | None = None,
        metrics: Metrics | None = None,
        min_bucket: int = MIN_BUCKET,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise UserError(
                f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1, "
                f"max_queue ({max_queue}) >= 0"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_seq_len = model.config.max_seq_len
        self.eos: set[int] = set(default_eos(model, tokenizer))
        compile = model.device.type == "cuda" if compile is None else compile
        self.dec = SlotDecoder(model, max_batch, compile, options, min_bucket, prefill_chunk)
        self.metrics = metrics or Metrics()
        self.device = model.device
        self.gen = torch.Generator(device=self.device)
        self.gen.seed()
        self.seen: torch.Tensor | None = (
            None  # (B, V) tokens a repetition penalty applies to, made when needed
        )
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[_Seq | None] = [None] * max_batch
        self.flight: _Flight | None = None
        self.firsts: _Firsts | None = None  # first tokens sampled after this step's prefill, on their way
        # feed the first tokens to the decode step on the device, and take them on the host once it is queued
        # (CUDA: the host's wait overlaps the step); else take them first (the host runs the step itself)
        self.feed_firsts = self.device.type == "cuda"
        self.accepting = True
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ called from other threads

    def submit(self, req: Request) -> None:
        """Queue a request (validated by the caller); QueueFull / Draining when it cannot be taken."""
        with self._cv:
            if not self.accepting:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue); retry shortly")
            self.waiting.append(req)
            self.metrics.queue.set(len(self.waiting))
            self._cv.notify()

    @torch.inference_mode()
    def warmup(self) -> None:
        """Decode steps per key-length bucket with every row idle (on CUDA: each bucket's step compiled, then its
        CUDA graph recorded, before the first request), then on CUDA with compilation the packed prefill's graphs."""
        B, d = self.max_batch, self.device
        for _ in range(2 if self.dec.compiled else 1):  # compiled: a first call warms up, the second records
            for n_keys in self.dec.buckets:
                self.dec.step(
                    torch.zeros(B, dtype=torch.long, device=d),
                    torch.full((B,), self.dec.scratch, device=d),
                    n_keys,
                )
        if self.dec.compiled:
            self.dec.packed.capture()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="smalto-engine", daemon=True)
        self._thread.start()

    def stop_admitting(self) -> None:
        with self._cv:
            self.accepting = False

    def shutdown(self) -> None:
        """Stop admitting, abort what is left, stop the thread."""
        with self._cv:
            self.accepting, self._stop = False, True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
        for req in list(self.waiting) + [s.req for s in self.slots if s is not None]:
            with contextlib.suppress(RuntimeError):  # its event loop is closed already: nobody waits
                req.emit(Output(finish_reason="abort"))
        self.waiting.clear()
        self.slots = [None] * self.max_batch

    def busy(self) -> int:
        return len(self.waiting) + sum(s is not None for s in self.slots)

    # ------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and all(s is None for s in self.slots):
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, not the server
                logging.getLogger("smalto.serve").exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit, queue the prefill, queue a decode step on the device, then take the
        prefill's first tokens and the previous decode step's tokens on the host while the device runs this one
        (those tokens feed this one on the device: a sequence that ended there has one wasted row in this step,
        whose token is dropped)."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if not self.feed_firsts:
            self._land_firsts(fed=False)
        flight = self._launch()
        self._land_firsts(fed=True)
        self._land(self.flight)
        self.flight = flight
        m = self.metrics
        running = sum(s is not None for s in self.slots)
        m.queue.set(len(self.waiting))
        m.running.set(running)
        m.occupancy.set(running / self.max_batch)

    def _drop_cancelled(self) -> None:
        for i, s in enumerate(self.slots):
            if s is not None and s.req.cancelled:
                s.done, self.slots[i] = True, None
        with self._cv:
            if any(r.cancelled for r in self.waiting):
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        for i in range(self.max_batch):
            if self.slots[i] is not None:
                continue
            with self._cv:
                if not self.waiting:
                    return
                req = self.waiting.popleft()
            text = TextStream(self.tokenizer, req.stop) if self.tokenizer is not None else None
            seq = _Seq(req=req, slot=i, text=text)
            if req.seed is not None:
                seq.gen = torch.Generator(device=self.device)
                seq.gen.manual_seed(req.seed)
            if req.params.repetition_penalty != 1.0:
                if self.seen is None:
                    V = self.model.config.vocab_size
                    self.seen = torch.zeros(self.max_batch, V, dtype=torch.bool, device=self.device)
                self.seen[i] = False
                self.seen[i, to_device(req.prompt, torch.long, self.device)] = True
            self.metrics.prompt_tokens.inc(len(req.prompt))
            self.slots[i] = seq

    def _prefill(self) -> None:
        """At most `prefill_chunk` prompt tokens over the prefilling sequences, oldest first: the first chunks go
        in one packed forward (on CUDA a captured graph: smalto/serve/prefill.py); a later chunk (or a prompt
        whose logprobs are asked for) in its own forward over its slot."""
        budget = self.prefill_chunk
        fresh: list[tuple[_Seq, list[int]]] = []
        pending: list[tuple[_Seq, torch.Tensor]] = []  # (sequence, its first token on the device)
        for seq in sorted((s for s in self.slots if s is not None and s.sampled == 0), key=_arrival):
            if budget == 0:
                break
            req = seq.req
            chunk = req.prompt[seq.written : seq.written + budget]
            budget -= len(chunk)
            if seq.written == 0 and not req.prompt_logprobs:
                fresh.append((seq, chunk))
                continue
            logits = self.dec.prefill(seq.slot, chunk, seq.written, all_logits=req.prompt_logprobs)
            first = None
            if req.prompt_logprobs:
                first = self._prompt_logprobs(seq, logits)
                logits = logits[-1]
            self._prefilled(seq, len(chunk), logits, pending, first)
        if fresh:
            last = self.dec.prefill_packed([(seq.slot, chunk) for seq, chunk in fresh])
            for (seq, chunk), logits in zip(fresh, last, strict=True):
                self._prefilled(seq, len(chunk), logits, pending)
        if pending:
            self.firsts = _Firsts.send(pending, self.device)

    def _prefilled(
        self,
        seq: _Seq,
        n: int,
        logits: torch.Tensor,
        pending: list[tuple[_Seq, torch.Tensor]],
        first: list[TokenLogprob | None] | None = None,
    ) -> None:
        """`n` more prompt tokens are in the cache; `logits` (V,) of the last: once the whole prompt is in,
        sample the first token, on the device: it joins `pending` (fed to this step's decode on the device,
        taken on the host once the decode is queued). A request that wants logprobs takes its token at once."""
        req = seq.req
        seq.written += n
        if seq.written < len(req.prompt):
            return
        if req.max_tokens == 0:  # the prompt alone (echo with its logprobs): nothing is sampled
            seq.done, self.slots[seq.slot] = True, None
            self.metrics.latency.observe(time.perf_counter() - req.arrival)
            if not req.cancelled:
                req.emit(Output(finish_reason="length", prompt_logprobs=first))
            return
        token = sample(logits[None], req.params, self._seen(seq), seq.gen or self.gen)
        seq.sampled = 1
        if self._seen(seq) is not None:
            self.seen[seq.slot, token] = True  # type: ignore[index]
        if req.logprobs is None and first is None:
            pending.append((seq, token))
            return
        lp = self._logprobs(logits[None], token, req.logprobs)
        self._accept(seq, int(token), lp[0] if lp else None, first)

    def _launch(self) -> _Flight | None:
        """Queue one decode step over the sequences that go on (their last token from the host after a prefill,
        else the previous step's on the device) and its sampling; start copying the tokens to the host."""
        rows = [
            s
            for s in self.slots
            if s is not None
            and s.sampled > 0
            and s.sampled < s.req.max_tokens
            and len(s.req.prompt) + s.sampled < self.max_seq_len
        ]
        if not rows:
            return None
        B, d = self.max_batch, self.device
        tokens, pos, from_host = [0] * B, [self.dec.scratch] * B, [False] * B
        for s in rows:
            pos[s.slot] = len(s.req.prompt) + s.sampled - 1
            if s.next_token is not None:
                tokens[s.slot], from_host[s.slot], s.next_token = s.next_token, True, None
        tok = to_device(tokens, torch.long, d)
        if self.flight is not None and not all(from_host[s.slot] for s in rows):
            tok = torch.where(to_device(from_host, torch.bool, d), tok, self.flight.out)
        if self.firsts is not None:  # first tokens sampled by this step's prefill, still on the device
            tok = tok.index_put((self.firsts.slots,), self.firsts.tokens)
        n_keys = self.dec.bucket(max(pos[s.slot] for s in rows) + 1)  # the step reads these positions only
        logits = self.dec.step(tok, to_device(pos, torch.long, d), n_keys)
        out = torch.zeros(B, dtype=torch.long, device=d)
        groups: dict[tuple, list[_Seq]] = {}
        for s in rows:
            s.sampled += 1
            if s.gen is not None:  # its own random stream: sampled alone, as a batch-1 generate would
                idx = to_device([s.slot], torch.long, d)
                out[idx] = sample(logits[idx], s.req.params, self._seen(s), s.gen)
            else:
                p = s.req.params
                groups.setdefault(
                    (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty), []
                ).append(s)
        for group in groups.values():
            idx = to_device([s.slot for s in group], torch.long, d)
            seen = self.seen.index_select(0, idx) if group[0].req.params.repetition_penalty != 1.0 else None  # type: ignore[union-attr]
            out[idx] = sample(logits.index_select(0, idx), group[0].req.params, seen, self.gen)
        penalised = [s.slot for s in rows if self._seen(s) is not None]
        if penalised:  # the next step's penalty sees this token (on the device: the host has not got it yet)
            idx = to_device(penalised, torch.long, d)
            self.seen.index_put_((idx, out[idx]), torch.ones((), dtype=torch.bool, device=d))  # type: ignore[union-attr]
        want = [s for s in rows if s.req.logprobs is not None]
        parts = [out]
        if want:
            idx = to_device([s.slot for s in want], torch.long, d)
            parts += self._logprob_tensors(logits[idx], out[idx], max(s.req.logprobs or 0 for s in want))
        cuda = d.type == "cuda"
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in parts]
        for h, t in zip(host, parts, strict=True):
            h.copy_(t, non_blocking=cuda)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record(torch.cuda.current_stream(d))
        return _Flight(rows=rows, out=out, host=host, ready=ready, want=want)

    def _land_firsts(self, fed: bool) -> None:
        """Take the first tokens of this step's prefill. `fed`: the decode step they feed is queued (the device
        runs on while the host waits for the prefill's end); else they go in from the host."""
        firsts, self.firsts = self.firsts, None
        if firsts is None:
            return
        for seq, token in zip(firsts.seqs, firsts.receive(), strict=True):
            if not seq.done and self.slots[seq.slot] is seq:
                self._accept(seq, token, None, fed=fed)

    def _land(self, flight: _Flight | None) -> None:
        """Take a decode step's tokens: each row still running gets its token (a row that ended or was cancelled
        meanwhile: dropped)."""
        if flight is None:
            return
        if flight.ready is not None:
            flight.ready.synchronize()  # that step's copies only: the step queued after it runs on
        tokens = flight.host[0].tolist()
        lps: dict[int, TokenLogprob] = {}
        if flight.want:
            for s, lp in zip(flight.want, self._logprob_lists(*flight.host[1:]), strict=True):
                lp.top = lp.top[: s.req.logprobs]
                lps[s.slot] = lp
        for s in flight.rows:
            if not s.done and self.slots[s.slot] is s:
                self._accept(s, tokens[s.slot], lps.get(s.slot))

    def _seen(self, seq: _Seq) -> torch.Tensor | None:
        if seq.req.params.repetition_penalty == 1.0 or self.seen is None:
            return None
        return self.seen[seq.slot : seq.slot + 1]

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, k: int | None) -> list[TokenLogprob]:
        """The model's log-probabilities (before sampling filters) of `tokens` and the top `k` per row."""
        if k is None:
            return []
        return self._logprob_lists(*self._logprob_tensors(logits, tokens, k))

    @staticmethod
    def _logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
        """(tokens (N,), their logprobs (N,), top-k logprobs (N, k), their token ids (N, k)), on the device."""
        lp = logits.float().log_softmax(-1)
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        return [tokens.view(-1), lp.gather(1, tokens.view(-1, 1))[:, 0], top_v, top_i]

    @staticmethod
    def _logprob_lists(
        tokens: torch.Tensor, chosen: torch.Tensor, top_v: torch.Tensor, top_i: torch.Tensor
    ) -> list[TokenLogprob]:
        return [
            TokenLogprob(int(t), c, list(zip(ti, tv, strict=True)))
            for t, c, ti, tv in zip(
                tokens.view(-1).tolist(), chosen.tolist(), top_i.tolist(), top_v.tolist(), strict=True
            )
        ]

    def _prompt_logprobs(self, seq: _Seq, logits: torch.Tensor) -> list[TokenLogprob | None] | None:
        """Logprobs of the prompt's tokens after the first, from a chunk's logits (T, V); all of them once the
        prompt is written, else None."""
        prompt, start = seq.req.prompt, seq.written
        nxt = prompt[start + 1 : start + 1 + logits.shape[0]]
        got = self._logprobs(logits[: len(nxt)], torch.tensor(nxt, device=self.device), seq.req.logprobs or 0)
        seq.prompt_logprobs.extend(got)
        return seq.prompt_logprobs if start + logits.shape[0] >= len(prompt) else None

    def _accept(
        self,
        seq: _Seq,
        token: int,
        lp: TokenLogprob | None,
        prompt_lp: list[TokenLogprob | None] | None = None,
        fed: bool = False,
    ) -> None:
        """Take a sampled token: stream its text, end the sequence if it is done, else feed it next step (`fed`:
        a first token already fed to the decode step on the device)."""
        req, m, now = seq.req, self.metrics, time.perf_counter()
        if seq.n_out == 0:
            m.ttft.observe(now - req.arrival)
        else:
            m.itl.observe(now - seq.last_time)
        seq.last_time = now
        seq.n_out += 1
        m.generation_tokens.inc()
        ended = token in req.stop_token_ids or (not req.ignore_eos and token in self.eos)
        out = Output(prompt_logprobs=prompt_lp, n_tokens=1)
        if not ended:
            out.token_ids = [token]
            out.logprobs = [lp] if lp is not None else []
            if seq.text is not None:
                out.text = seq.text.add(token)
                ended = seq.text.stopped
        elif (
            seq.text is not None
        ):  # an end token: the text held back (a partial character or stop string) is final
            out.text = seq.text.finish()
        reason = "stop" if ended else None
        if reason is None and (
            seq.n_out >= req.max_tokens or len(req.prompt) + seq.n_out >= self.max_seq_len
        ):
            reason = "length"
        if reason is not None:
            if seq.text is not None and reason == "length":
                out.text += seq.text.finish()
            out.finish_reason = reason
            seq.done, self.slots[seq.slot] = True, None
            m.latency.observe(now - req.arrival)
        elif seq.n_out == 1 and not fed:  # a first token taken at once goes in from the host; later ones, and
            seq.next_token = token  # pending first tokens, are fed on the device
        if req.cancelled:
            return
        req.emit(out)

    def _fail_all(self, message: str) -> None:
        self.flight = self.firsts = None
        for i, s in enumerate(self.slots):
            if s is not None:
                s.req.emit(Output(finish_reason="abort", error=message))
                self.slots[i] = None


def _arrival(seq: _Seq) -> float:
    return seq.req.arrival
