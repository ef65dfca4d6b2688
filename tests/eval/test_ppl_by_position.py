"""Perplexity by position: a tiny ALiBi model trained at 256 tokens stays flat to 512; the buckets equal the plain
full-logits cross-entropy; a learned-position model is refused past its table; bad DATA is named."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smalto.errors import ConfigError, DataError
from smalto.eval.by_position import perplexity_by_position
from smalto.eval.run import EvalConfig, run
from smalto.model.mpt import MPTForCausalLM
from tests import forkrun
from tests.helpers import tiny_config

TRAINED = 256
VOCAB = 384


TRAIN_FILES = ("argparse.py", "typing.py", "subprocess.py", "dataclasses.py")
HELD_OUT_FILES = ("difflib.py", "configparser.py")


@pytest.fixture(scope="module")
def stdlib_text() -> tuple[list[str], list[str]]:
    """Real, repetitive text: modules of the Python standard library, some to train on, others held out."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    read = [
        [(root / f).read_text(encoding="utf-8") for f in files] for files in (TRAIN_FILES, HELD_OUT_FILES)
    ]
    return read[0], read[1]


@pytest.fixture(scope="module")
def alibi_dir(tmp_path_factory, stdlib_text) -> Path:
    """A 2-layer ALiBi MPT with a BPE tokenizer of its own, trained on 256-token windows, saved as an HF folder."""
    from transformers import PreTrainedTokenizerFast

    from smalto.demo import train_tokenizer
    from smalto.hf import save_pretrained

    train, _ = stdlib_text
    root = tmp_path_factory.mktemp("alibi")
    train_tokenizer(train, VOCAB, root / "tok", TRAINED)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tok" / "tokenizer.json"))
    stream = torch.tensor(
        [t for doc in train for t in tok(doc)["input_ids"] + [tok.convert_tokens_to_ids("<|endoftext|>")]]
    )
    torch.manual_seed(0)
    cfg = tiny_config(
        max_seq_len=TRAINED, vocab_size=VOCAB, no_bias=True, attn_config={"alibi": True, "attn_impl": "sdpa"}
    )
    model = MPTForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shapes this small run several times faster on one thread than on two
    try:
        for _ in range(200):
            starts = torch.randint(0, len(stream) - TRAINED, (4,), generator=gen)
            ids = torch.stack([stream[s : s + TRAINED] for s in starts.tolist()])
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_pretrained(model.eval(), root / "model", tokenizer=str(root / "tok"))
    return root / "model"


def test_an_alibi_model_trained_at_256_stays_flat_to_512(alibi_dir, stdlib_text, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_text[1]))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["eval", str(alibi_dir), "--ppl-by-position", str(held), "--length", "512", "--buckets", "8"]
    r = forkrun.run(
        [sys.executable, "-m", "smalto", *args, "--limit", "12", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "Perplexity by position" in r.stdout and "448–512 *" in r.stdout
    res = json.loads((out / "results.json").read_text())["perplexity_by_position"]
    assert (res["length"], res["trained_length"], res["windows"]) == (512, TRAINED, 12)
    assert [(b["start"], b["end"]) for b in res["buckets"]] == [(64 * i, 64 * i + 64) for i in range(8)]
    assert [b["beyond_training"] for b in res["buckets"]] == [False] * 4 + [True] * 4
    inside = [b["perplexity"] for b in res["buckets"] if not b["beyond_training"]]
    assert (
        math.log(np.mean(inside)) < math.log(VOCAB) - 1
    )  # it learned the text: far from uniform (untrained)
    assert res["buckets"][-1]["perplexity"] <= 1.5 * np.mean(inside)  # and does not blow up past 256
    assert max(b["perplexity"] for b in res["buckets"]) <= 1.5 * np.mean(inside)
    assert (out / "ppl_by_position.png").stat().st_size > 0


def test_a_learned_position_model_is_refused_past_its_table(tmp_path, neox_tokenizer_dir):
    from smalto.hf import save_pretrained

    torch.manual_seed(0)
    model = MPTForCausalLM(
        tiny_config(max_seq_len=32, vocab_size=50432)
    ).eval()  # learned positions, no ALiBi
    save_pretrained(model, tmp_path / "m", tokenizer=str(neox_tokenizer_dir))
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20)
    with pytest.raises(ConfigError) as e:
        run(EvalConfig(model=str(tmp_path / "m"), ppl_by_position=str(text), length=64, device="cpu"))
    assert "learned position embeddings (no ALiBi or RoPE), a table of 32 positions" in str(e.value)
    assert "use --length 32 or less" in str(e.value)
    with pytest.raises(ConfigError, match="learned position embeddings"):
        perplexity_by_position(model, text, length=33, tokenizer=None)
    # within its table it runs (the default window of a learned-position model is its table)
    res = run(EvalConfig(model=str(tmp_path / "m"), ppl_by_position=str(text), device="cpu", buckets=4))
    assert res["perplexity_by_position"]["length"] == 32


def _mds(folder: Path, rows: list[np.ndarray]) -> Path:
    from smalto.data.mds import MDSWriter

    w = MDSWriter(folder / "val")
    for r in rows:
        w.write(r.astype(np.int32))
    w.finish()
    return folder


def _reference(model, stream: np.ndarray, length: int, n: int) -> np.ndarray:
    """(length,) CE summed over windows by target position, from the full logits (float64 softmax)."""
    sums = np.zeros(length)
    with torch.no_grad():
        for w in range(n):
            ids = torch.as_tensor(stream[w * length : (w + 1) * length], dtype=torch.long)[None]
            logits = model(ids).logits[0, :-1].double()
            sums[1:] += F.cross_entropy(logits, ids[0, 1:], reduction="none").numpy()
    return sums


@pytest.mark.parametrize("kind", ["smalto", "transformers"])
def test_buckets_equal_the_full_logits_loss(kind, tmp_path, gpt2):
    torch.manual_seed(0)
    if kind == "smalto":
        model = MPTForCausalLM(
            tiny_config(max_seq_len=64, vocab_size=256, attn_config={"alibi": True})
        ).eval()
    else:
        model = gpt2
    vocab = model.get_output_embeddings().weight.shape[0] if kind == "transformers" else 256
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, vocab, n) for n in (50, 70, 30, 100)]  # 250 tokens: 3 windows of 64 (or 80)
    data = _mds(tmp_path, rows)
    length = 64 if kind == "smalto" else 80
    # a chunk of 5 positions: the head runs in many pieces, one ending mid-window
    res = perplexity_by_position(model, data, length=length, buckets=4, chunk_bytes=4 * vocab * 5)
    stream = np.concatenate(rows)
    n = len(stream) // length
    ref = _reference(model, stream, length, n)
    assert res["windows"] == n and res["tokens"] == n * (length - 1)
    edges = [0, length // 4, length // 2, 3 * length // 4, length]
    for b, (s, e) in zip(res["buckets"], itertools.pairwise(edges), strict=True):
        assert (b["start"], b["end"]) == (s, e)
        assert b["tokens"] == (e - max(s, 1)) * n
        assert b["loss"] == pytest.approx(ref[max(s, 1) : e].sum() / b["tokens"], rel=1e-5)
    assert res["loss"] == pytest.approx(ref.sum() / res["tokens"], rel=1e-5)


def _alibi_folder(tmp_path: Path, tokenizer_dir: Path) -> Path:
    from smalto.hf import save_pretrained

    model = MPTForCausalLM(tiny_config(max_seq_len=256, vocab_size=50432, attn_config={"alibi": True}))
    return save_pretrained(model, tmp_path / "alibi", tokenizer=str(tokenizer_dir))


def test_bad_data_and_options_are_named(tmp_path, neox_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(neox_tokenizer_dir))
    model = MPTForCausalLM(tiny_config(max_seq_len=64, vocab_size=50432, attn_config={"alibi": True})).eval()
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected an object with a string field 'text'"):
        perplexity_by_position(model, bad, length=16, tokenizer=tok)
    short = tmp_path / "s.txt"
    short.write_text("too short")
    with pytest.raises(DataError, match="fewer than one window of --length 64"):
        perplexity_by_position(model, short, length=64, tokenizer=tok)
    with pytest.raises(ConfigError, match="--buckets 40: give between 1 and 32"):
        perplexity_by_position(model, short, length=64, buckets=40, tokenizer=tok)
    with pytest.raises(ConfigError, match="--length applies to --ppl-by-position"):
        EvalConfig(model="m", tasks=["copa"], length=512)
    with pytest.raises(ConfigError, match=r"--buckets 300: give between 1 and 256 \(half of --length 512\)"):
        run(
            EvalConfig(
                model=str(_alibi_folder(tmp_path, neox_tokenizer_dir)),
                ppl_by_position=str(short),
                buckets=300,
            )
        )
    with pytest.raises(DataError, match="no such file or folder"):
        run(EvalConfig(model="m", ppl_by_position=str(tmp_path / "missing.txt"), device="cpu"))


def test_text_documents_start_as_the_tokenizer_starts_a_text(tmp_path: Path) -> None:
    """A LLaMA tokenizer's documents each start with its BOS (llm-foundry's concatenating dataset writes
    `tokenizer(text)`), joined by EOS; GPT-NeoX's start with nothing (its tokenizer adds nothing)."""
    from smalto.eval.by_position import read_tokens
    from tests.test_llama import byte_fallback_tokenizer

    tok = byte_fallback_tokenizer(tmp_path / "tok")
    docs = ["the quick brown fox", "hello world"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    want = [t for d in docs for t in [*tok(d)["input_ids"], tok.eos_token_id]]
    assert want[0] == tok.bos_token_id
    assert read_tokens(tmp_path / "d.jsonl", tok, None).tolist() == want
