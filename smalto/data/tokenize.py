"""`smalto data`: raw documents → token shards in Streaming's MDS layout.

Output folder (one source):           Several sources: one such folder per source name.
    OUT/smalto_data.json  metadata        OUT/smalto_data.json
    OUT/train/index.json  + shards        OUT/NAME/train/..., OUT/NAME/val/...
    OUT/val/index.json    + shards        (each OUT/NAME is one dataset to mix with a proportion)

Each document becomes [BOS] tokens EOS. With wrapping (the default) documents are concatenated and cut
into windows of exactly `seq_len` tokens, as llm-foundry's `concat_tokens` does; the final partial window
is dropped. With `wrap=False` every document is its own sample, truncated to `seq_len`.
A document goes to `val` when a stable hash of its text falls below `val_fraction`, so the split does not
depend on file order or on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smalto.data.mds import MDSWriter, check_compression
from smalto.data.sources import FORMATS, ErrorPolicy, Source, file_digest, iter_documents, resolve
from smalto.errors import DataError

META = "smalto_data.json"
_CHUNK = 512  # documents per task sent to a worker: big enough to amortize pickling


@dataclass(kw_only=True)
class TokenizeConfig:
    sources: list[str]
    """Inputs, each `name=path` or `path`; path is a file, folder, glob, HF datasets folder or `-` (stdin)."""
    out: Path
    tokenizer: str
    """A tokenizer folder, a tokenizer.json, or a name AutoTokenizer can load offline."""
    seq_len: int = 2048
    wrap: bool = True
    bos: bool = False
    eos_token: str | None = None
    """Override the EOS token (by text) when the tokenizer does not declare one."""
    text_field: str = "text"
    format: str = "auto"
    shard_size: int = 1 << 26
    compression: str | None = None
    dtype: str = "int32"
    val_fraction: float = 0.0
    workers: int = 1
    on_error: str = "raise"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.sources:
            raise DataError("no sources given: pass at least one input path (or - for stdin)")
        if self.seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.on_error not in ("raise", "skip"):
            raise DataError(f"--on-error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.format not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.dtype not in ("int32", "uint16"):
            raise DataError(f"--dtype must be int32 or uint16, got {self.dtype!r}")
        if self.shard_size < 1024:
            raise DataError(f"--shard-size must be at least 1024 bytes, got {self.shard_size}")
        if self.workers < 1:
            raise DataError(f"--workers must be at least 1, got {self.workers}")
        check_compression(self.compression)


# ---- the tokenizer ----


@dataclass(kw_only=True)
class TokenizerInfo:
    name: str
    tokenizer_json: str | None
    sha256: str | None
    vocab_size: int
    eos_id: int
    bos_id: int | None


def _special(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(spec: str, eos_token: str | None = None) -> tuple[Any, TokenizerInfo]:
    """A `tokenizers.Tokenizer` when a tokenizer.json exists (fast, no transformers import), else AutoTokenizer."""
    path = Path(spec)
    tj = path / "tokenizer.json" if path.is_dir() else path if path.suffix == ".json" else None
    config: dict[str, Any] = {}
    cfg_file = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if cfg_file.exists():
        try:
            config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{cfg_file} is not valid JSON ({e})") from None
    if tj is not None and tj.exists():
        from tokenizers import Tokenizer

        try:
            tok: Any = Tokenizer.from_file(str(tj))
        except Exception as e:  # the tokenizers library raises a bare Exception for a corrupt file
            raise DataError(
                f"cannot read tokenizer file {tj} ({e}); replace it with a valid tokenizer.json"
            ) from None
        token_id = tok.token_to_id
        vocab = tok.get_vocab_size(with_added_tokens=True)
        sha = hashlib.sha256(tj.read_bytes()).hexdigest()
    else:
        if tj is not None:
            raise DataError(f"tokenizer file {tj} does not exist")
        try:
            from transformers import AutoTokenizer

            from smalto.tokenizer import quiet_length_warning

            tok = quiet_length_warning(AutoTokenizer.from_pretrained(spec))
        except Exception as e:
            raise DataError(
                f"cannot load tokenizer {spec!r} ({e}); pass a folder with tokenizer.json"
            ) from None
        token_id = tok.convert_tokens_to_ids
        vocab = len(tok)
        config = {"eos_token": tok.eos_token, "bos_token": tok.bos_token}
        sha = None
    eos_text = eos_token or _special(config, "eos_token")
    eos_id = token_id(eos_text) if eos_text else None
    if eos_token and (eos_id is None or eos_id == getattr(tok, "unk_token_id", None)):
        raise DataError(
            f"--eos-token {eos_token!r} is not in the vocabulary of tokenizer {spec!r}; "
            "pass one of its tokens (e.g. '<|endoftext|>' or '</s>')"
        )
    if eos_id is None:
        raise DataError(f"tokenizer {spec!r} declares no EOS token; name one with --eos-token")
    bos_text = _special(config, "bos_token")
    bos_id = token_id(bos_text) if bos_text else None
    info = TokenizerInfo(
        name=path.name if path.is_dir() else spec,
        tokenizer_json=str(tj) if tj else None,
        sha256=sha,
        vocab_size=vocab,
        eos_id=int(eos_id),
        bos_id=None if bos_id is None else int(bos_id),
    )
    return tok, info


_worker_tok: Any = None


def _init_worker(spec: str, eos_token: str | None) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; avoid oversubscription
    _worker_tok, _ = load_tokenizer(spec, eos_token)


def _encode(texts: list[str], tok: Any = None) -> list[np.ndarray]:
    tok = tok or _worker_tok
    if hasattr(tok, "encode_batch"):
        return [np.asarray(e.ids, np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]
    return [np.asarray(ids, np.int64) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def is_val(text: str, val_fraction: float) -> bool:
    """Stable across runs, machines and worker counts: depends on the document text only."""
    if val_fraction <= 0.0:
        return False
    h = int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )
    return h / 2.0**64 < val_fraction


# ---- windows ----


@dataclass
class SplitWriter:
    """Concatenates documents of one split and cuts samples, counting what it wrote and dropped."""

    writer: MDSWriter
    seq_len: int
    wrap: bool
    documents: int = 0
    samples: int = 0
    tokens: int = 0
    dropped_tokens: int = 0
    truncated_documents: int = 0
    _buf: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0

    def add(self, doc: np.ndarray) -> None:
        self.documents += 1
        if not self.wrap:
            if len(doc) > self.seq_len:
                self.truncated_documents += 1
                self.dropped_tokens += len(doc) - self.seq_len
                doc = doc[: self.seq_len]
            self._emit(doc)
            return
        self._buf.append(doc)
        self._buffered += len(doc)
        if self._buffered >= self.seq_len:
            flat = np.concatenate(self._buf)
            n = len(flat) // self.seq_len * self.seq_len
            for start in range(0, n, self.seq_len):
                self._emit(flat[start : start + self.seq_len])
            self._buf = [flat[n:].copy()]  # not a view: it would keep all of `flat` alive
            self._buffered = len(flat) - n

    def _emit(self, sample: np.ndarray) -> None:
        self.writer.write(sample)
        self.samples += 1
        self.tokens += len(sample)

    def finish(self) -> dict[str, Any]:
        self.dropped_tokens += self._buffered  # the final partial window, as llm-foundry drops it
        shards = self.writer.finish()
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.tokens,
            "dropped_tokens": self.dropped_tokens,
            "truncated_documents": self.truncated_documents,
            "shards": len(shards),
        }


# ---- the conversion ----


def _chunks(
    sources: list[Source], cfg: TokenizeConfig, policy: ErrorPolicy
) -> Iterator[tuple[int, list[str]]]:
    """(source index, texts) in input order; empty documents are skipped (they carry no tokens)."""
    for si, src in enumerate(sources):
        texts: list[str] = []
        for path in src.files:
            for text, _ in iter_documents(
                path, fmt=cfg.format, text_field=cfg.text_field, on_error=policy, hf_dataset=src.hf_dataset
            ):
                if text:
                    texts.append(text)
                if len(texts) >= _CHUNK:
                    yield si, texts
                    texts = []
        if texts:
            yield si, texts


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),  # of the input bytes (nothing shown for stdin)
        TextColumn("{task.fields[docs]:,} docs ({task.fields[dps]:,.0f}/s)"),
        TextColumn("{task.fields[toks]:,} tokens ({task.fields[tps]:,.0f}/s)"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _input_bytes(sources: list[Source]) -> int | None:
    """The inputs' size on disk, the progress bar's 100%; None when one is stdin (no size known)."""
    files = [f for s in sources for f in s.files]
    if "-" in files:
        return None
    return sum(Path(f).stat().st_size for f in files if Path(f).is_file()) or None


def tokenize_to_shards(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run the conversion; returns the metadata it also writes to OUT/smalto_data.json."""
    if cfg.out.exists() and not cfg.overwrite:
        raise DataError(f"output folder {cfg.out} already exists; pass --overwrite to replace it")
    sources = [resolve(Source.parse(s)) for s in cfg.sources]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"source names must be unique, got {names}; name them as NAME=PATH")
    if sum(f == "-" for s in sources for f in s.files) > 1:
        raise DataError("stdin (-) can be given only once")
    tok, info = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    if cfg.bos and info.bos_id is None:
        raise DataError(f"--bos was asked for but tokenizer {cfg.tokenizer!r} declares no BOS token")
    if cfg.dtype == "uint16" and info.vocab_size > 1 << 16:
        raise DataError(f"--dtype uint16 cannot hold a vocabulary of {info.vocab_size}; use int32")

    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.parent / f".{cfg.out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = _convert(cfg, sources, tok, info, tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if cfg.out.exists():
            old = cfg.out.parent / f".{cfg.out.name}.old-{os.getpid()}"
            cfg.out.rename(old)
            tmp.rename(cfg.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives an error or Ctrl-C
        raise
    return meta


def _convert(
    cfg: TokenizeConfig, sources: list[Source], tok: Any, info: TokenizerInfo, tmp: Path
) -> dict[str, Any]:
    multi = len(sources) > 1
    splits = ["train", "val"] if cfg.val_fraction > 0 else ["train"]
    writers = [
        {
            sp: SplitWriter(
                MDSWriter(
                    tmp / (s.name if multi else "") / sp,
                    dtype=cfg.dtype,
                    compression=cfg.compression,
                    size_limit=cfg.shard_size,
                ),
                cfg.seq_len,
                cfg.wrap,
            )
            for sp in splits
        }
        for s in sources
    ]
    policy = ErrorPolicy(cfg.on_error)
    prefix = np.array([info.bos_id] if cfg.bos else [], np.int64)
    suffix = np.array([info.eos_id], np.int64)
    docs = toks = 0
    start = time.perf_counter()
    pool = None
    if cfg.workers > 1:
        pool = mp.get_context("spawn").Pool(
            cfg.workers, initializer=_init_worker, initargs=(cfg.tokenizer, cfg.eos_token)
        )
    try:
        with _progress(cfg.progress) as bar:
            total = _input_bytes(sources)
            task = bar.add_task("tokenizing", total=total, docs=0, toks=0, dps=0.0, tps=0.0)
            read = 0  # UTF-8 bytes of text tokenized: about the bytes of input read (less any JSON markup)
            pending: deque[tuple[int, list[str], Any]] = deque()

            def drain(limit: int) -> None:
                nonlocal docs, toks, read
                while len(pending) > limit:
                    si, texts, result = pending.popleft()
                    encoded = result.get() if pool else result
                    for text, ids in zip(texts, encoded, strict=True):
                        split = "val" if is_val(text, cfg.val_fraction) else "train"
                        writers[si][split].add(np.concatenate([prefix, ids, suffix]))
                        toks += len(ids) + len(prefix) + 1
                        read += len(text.encode("utf-8", "surrogatepass"))
                    docs += len(texts)
                    dt = max(time.perf_counter() - start, 1e-9)
                    done = min(read, int(0.99 * total)) if total else read  # 100% only when finished
                    bar.update(task, completed=done, docs=docs, toks=toks, dps=docs / dt, tps=toks / dt)

            for si, texts in _chunks(sources, cfg, policy):
                pending.append(
                    (si, texts, pool.apply_async(_encode, (texts,)) if pool else _encode(texts, tok))
                )
                drain(2 * cfg.workers if pool else 0)  # keep every worker busy while bounding memory
            drain(0)
            bar.update(task, completed=total or read)
    finally:
        if pool:
            pool.terminate()
    if docs == 0:
        skipped = f" ({policy.skipped} bad records skipped)" if policy.skipped else ""
        raise DataError(f"no documents found in {', '.join(cfg.sources)}{skipped}: the input is empty")
    per_source, notes = [], []
    for src, ws in zip(sources, writers, strict=True):
        stats = {sp: w.finish() for sp, w in ws.items()}
        if "val" in stats and stats["val"]["samples"] == 0:  # an empty split is one no reader accepts
            shutil.rmtree(tmp / (src.name if multi else "") / "val")
            notes.append(
                f"{src.name}: no val/ split written: --val-fraction {cfg.val_fraction} of "
                f"{stats['val']['documents'] + stats['train']['documents']} documents gave "
                f"{stats['val']['documents']} documents and no full sample of --seq-len {cfg.seq_len}; "
                "raise --val-fraction for a validation split"
            )
            del stats["val"]
        if stats["train"]["samples"] == 0:
            raise DataError(
                f"source {src.name!r}: {stats['train']['tokens'] + stats['train']['dropped_tokens']} tokens do not fill "
                f"one window of --seq-len {cfg.seq_len}; lower --seq-len or use --no-wrap"
            )
        files = [file_digest(f) for f in src.files if f != "-" and Path(f).is_file()]
        per_source.append({"name": src.name, "spec": src.spec, "splits": stats, "files": files})
    seconds = time.perf_counter() - start
    return {
        "format": "smalto-data/1",
        "tokenizer": asdict(info),
        "seq_len": cfg.seq_len,
        "wrap": cfg.wrap,
        "bos": cfg.bos,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "val_fraction": cfg.val_fraction,
        "documents": docs,
        "tokens": toks,
        "skipped_records": policy.skipped,
        "skipped_examples": policy.first,
        "notes": notes,
        "seconds": round(seconds, 3),
        "sources": per_source,
    }
