"""Perplexity by position (`smalto eval MODEL --ppl-by-position DATA`): how a token's loss depends on how far into
its window it sits, up to a length longer than the model was trained on. This is how a user checks that ALiBi (or
RoPE) extrapolates: the curve stays flat past the trained length, or it blows up.

DATA is read as one stream of tokens: a text file (one document), a JSONL file ({"text": ...} per line, one
document each) or token shards (an MDS split or a `smalto data` folder, rows in index order). Documents are joined
with EOS, as `smalto data` concatenates them, and the stream is cut into windows of `length` tokens (a last partial
window is dropped). Each window is one forward from its first token: the token at position p (1 ≤ p < length) is
predicted from the p tokens before it. Positions fall into `buckets` equal ranges; a bucket's loss is the mean
cross-entropy of its tokens over all windows (nats), its perplexity the exp of that.

Memory: one window's hidden states, then the head and the cross-entropy a chunk of positions at a time (as the
chunked training loss), so the (length, vocab) logits are never held whole; one window per forward.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from smalto.errors import ConfigError, DataError
from smalto.eval.scorer import is_smalto, model_max_len
from smalto.kernels.chunked_loss import CHUNK_BYTES
from smalto.tokenizer import leading_special_ids

DEFAULT_BUCKETS = 8


def check_data(data: str | Path) -> None:
    """Refuse a DATA path that cannot be read, before any weights load."""
    p = Path(data)
    if p.is_dir():
        from smalto.eval.perplexity import find_split

        find_split(p)
    elif not p.is_file():
        raise DataError(
            f"--ppl-by-position {p}: no such file or folder; give a text file, a JSONL file of {{'text': ...}} "
            "lines, or token shards (a `smalto data` folder or an MDS split)"
        )


def window_length(model_path: str | Path, length: int | None) -> tuple[int, int, int | None]:
    """(window length, trained length, max_seq_len to load the model with or None) for `model_path`, read from its
    config only. The default window is twice the trained length for ALiBi / RoPE models. A model with learned
    positions has one row per position: past its table it is refused."""
    from smalto.eval.models import SMALTO_MODEL_TYPES

    p = Path(model_path)
    raw = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    if isinstance(raw, dict) and raw.get("model_type") not in SMALTO_MODEL_TYPES and raw:
        trained = next(
            (
                v
                for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                if isinstance(v := raw.get(k), int)
            ),
            2048,
        )
        if length is not None and length > trained:
            raise ConfigError(
                f"--length {length}: {p} (model_type {raw.get('model_type')!r}, computed by transformers) holds "
                f"{trained} positions, and smalto extends only the models it computes (MPT, LLaMA, Mistral); "
                f"use --length {trained} or less"
            )
        return length or trained, trained, None
    from smalto.load import model_config

    cfg = model_config(p)
    trained = cfg.max_seq_len
    if cfg.uses_wpe:
        if length is not None and length > trained:
            raise ConfigError(learned_positions_message(str(p), trained, length))
        return length or trained, trained, None
    length = length or 2 * trained
    return length, trained, length if length > trained else None


def learned_positions_message(model: str, table: int, length: int) -> str:
    return (
        f"--length {length}: {model} has learned position embeddings (no ALiBi or RoPE), a table of {table} "
        f"positions, so it cannot score position {table} or later; use --length {table} or less (models with "
        "ALiBi or RoPE extrapolate past their training length)"
    )


def read_tokens(data: str | Path, tokenizer: Any, need: int | None) -> np.ndarray:
    """The token stream of DATA (documents joined with EOS), stopping once `need` tokens are read (None: all)."""
    p = Path(data)
    if p.is_dir():
        from smalto.data.dataset import MDSDataset
        from smalto.eval.perplexity import find_split

        ds = MDSDataset(find_split(p))
        rows: list[np.ndarray] = []
        have = 0
        for i in range(len(ds)):
            rows.append(ds.tokens(i).astype(np.int64))
            have += len(rows[-1])
            if need is not None and have >= need:
                break
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if tokenizer is None:
        raise ConfigError(f"--ppl-by-position {p}: text needs the model's tokenizer")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            f"the tokenizer declares no EOS token to join the documents of {p}; pass --tokenizer DIR with one"
        )
    lead = list(leading_special_ids(tokenizer))  # LLaMA's BOS before each document, as llm-foundry's concat
    parts: list[np.ndarray] = []
    have = 0
    for doc in _documents(p):
        ids = lead + tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        parts.append(np.asarray(ids, np.int64))
        have += len(ids)
        if need is not None and have >= need:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _documents(p: Path) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if p.suffix != ".jsonl":
        yield text
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{p}:{n}: expected an object with a string field 'text', got {line[:80]!r}")
        yield row["text"]


@torch.no_grad()
def perplexity_by_position(
    model: Any,
    data: str | Path,
    *,
    length: int,
    tokenizer: Any = None,
    buckets: int = DEFAULT_BUCKETS,
    limit: int | None = None,
    trained_length: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """{"data", "length", "trained_length", "windows", "tokens", "loss", "perplexity", "seconds", "buckets": [{"start",
    "end", "tokens", "loss", "perplexity", "beyond_training"}]}. `limit`: at most this many windows. Windows are split
    across ranks and the sums all-reduced. `on_batch(windows done, windows)` after each of this rank's windows."""
    if length < 2:
        raise ConfigError(f"--length {length}: a window needs at least 2 tokens")
    if not 1 <= buckets <= length // 2:
        raise ConfigError(f"--buckets {buckets}: give between 1 and {length // 2} (half of --length) buckets")
    _check_model_length(model, length)
    trained = trained_length or model_max_len(model)
    stream = read_tokens(data, tokenizer, None if limit is None else limit * length)
    n = len(stream) // length if limit is None else min(limit, len(stream) // length)
    if n == 0:
        raise DataError(
            f"{data} holds {len(stream):,} tokens, fewer than one window of --length {length}; give more text or "
            "a shorter --length"
        )
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _dist() else (0, 1)
    device = next(model.parameters()).device
    vocab = _vocab(model)
    chunk = max(1, chunk_bytes // (4 * vocab))
    sums = torch.zeros(
        length, dtype=torch.float64, device=device
    )  # CE summed over windows, by target position
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    mine = range(rank, n, world)
    try:
        for done, w in enumerate(mine, 1):
            ids = torch.as_tensor(stream[w * length : (w + 1) * length], device=device)[None]
            sums[1:] += _window_ce(model, ids, chunk)
            if on_batch is not None:
                on_batch(done, len(mine))
    finally:
        model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(sums)
    per_position = sums.cpu().numpy()
    edges = np.linspace(0, length, buckets + 1).round().astype(int)
    rows = []
    for start, end in itertools.pairwise(edges):
        first = max(int(start), 1)  # position 0 has nothing before it: no prediction
        tokens = (int(end) - first) * n
        loss = float(per_position[first:end].sum() / tokens)
        rows.append(
            {
                "start": int(start),
                "end": int(end),
                "tokens": tokens,
                "loss": loss,
                "perplexity": math.exp(loss),
                "beyond_training": bool(end > trained),
            }
        )
    loss = float(per_position.sum() / ((length - 1) * n))
    return {
        "data": str(data),
        "length": length,
        "trained_length": trained,
        "windows": n,
        "tokens": (length - 1) * n,
        "loss": loss,
        "perplexity": math.exp(loss),
        "seconds": time.perf_counter() - t0,
        "buckets": rows,
    }


def _check_model_length(model: Any, length: int) -> None:
    if not is_smalto(model):
        if length > model_max_len(model):
            raise ConfigError(
                f"--length {length} is past the model's {model_max_len(model)} positions; smalto extends only the "
                "models it computes (MPT, LLaMA, Mistral)"
            )
        return
    c = model.config
    if length <= c.max_seq_len:
        return
    if c.uses_wpe:
        raise ConfigError(learned_positions_message("the model", c.max_seq_len, length))
    raise ConfigError(
        f"--length {length} is past the model's max_seq_len {c.max_seq_len}; load it with a larger one "
        f"(smalto.load(path, max_seq_len={length}); `smalto eval` does so itself)"
    )


def _vocab(model: Any) -> int:
    if is_smalto(model):
        return int(model.unembedding.shape[0])
    return int(model.get_output_embeddings().weight.shape[0])


def _window_ce(model: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """(T-1,) float64 next-token cross-entropy of one window (1, T): the head a chunk of positions at a time."""
    if is_smalto(model):
        h, head = model.transformer(ids)[0], model.unembed
    else:
        h, head = model.base_model(input_ids=ids).last_hidden_state[0], model.get_output_embeddings()
    T = ids.shape[1]
    out = torch.empty(T - 1, dtype=torch.float64, device=ids.device)
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        logits = head(h[s:e]).float()
        out[s:e] = F.cross_entropy(logits, ids[0, s + 1 : e + 1], reduction="none").double()
    return out


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def position_chart(path: Path, res: dict[str, Any], title: str = "") -> Path | None:
    """Perplexity per position bucket as a PNG (None when matplotlib is missing), the trained length marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    b = res["buckets"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([(r["start"] + r["end"]) / 2 for r in b], [r["perplexity"] for r in b], "o-")
    ax.axvline(
        res["trained_length"], color="grey", ls="--", label=f"trained length {res['trained_length']:,}"
    )
    ax.set(
        title=title or "perplexity by position", xlabel="position in the window (tokens)", ylabel="perplexity"
    )
    ax.set_xlim(0, res["length"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
