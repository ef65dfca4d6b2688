"""Long prompts: chunked prefill equals one forward, its pieces stay bounded; `--prompt-file`; learned positions
are refused past their table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smalto.errors import UserError
from smalto.generate import MIN_PREFILL_CHUNK, generate, get_decoder, prefill_spans
from smalto.hf import save_pretrained
from smalto.model.attention import SDPA, SDPA_BIAS_BUDGET, AttentionKernel, AttentionPlan
from smalto.model.mpt import MPTForCausalLM
from tests import forkrun
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]

# overrides of tests.helpers.tiny_config (64 wide, 4 heads, 2 layers, vocab 256)
ALIBI = dict(max_seq_len=80, no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 16, "clip_qkv": 6})
ROPE_GQA = dict(
    max_seq_len=80, attn_config={"rope": True, "kv_n_heads": 2}, ffn_config={"ffn_type": "mptglu"}
)
LEARNED_POS = dict(max_seq_len=80, learned_pos_emb=True)
WINDOW = dict(max_seq_len=80, attn_config={"alibi": True, "sliding_window_size": 9})

LENGTHS = (41, 23, 6)  # left-padded into one batch of 41 positions
CHUNKS = (1, 5, 16, 17, 64)


def make_model(spec: dict) -> MPTForCausalLM:
    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_config(**spec)).eval()
    with torch.no_grad():  # peaky logits: greedy near-ties cannot flip a comparison
        model.transformer.wte.weight.mul_(8)
    return model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in LENGTHS]


class Spy:
    """The prefill plan's SDPA kernel, recording each attention call's query and key lengths."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

        def attend(q, k, v, qkv, inputs, scale, dropout_p):
            self.calls.append((q.shape[2], k.shape[2]))
            return SDPA.attend(q, k, v, qkv, inputs, scale, dropout_p)

        self.plan = AttentionPlan(AttentionKernel("spy", attend, prepare=SDPA.prepare), "test")


@torch.no_grad()
@pytest.mark.parametrize(
    "spec", [ALIBI, ROPE_GQA, LEARNED_POS, WINDOW], ids=["alibi", "rope", "learned", "window"]
)
def test_chunked_prefill_equals_full_forward_and_stays_bounded(spec: dict) -> None:
    model = make_model(spec)
    rows = prompts()
    B, L = len(rows), max(LENGTHS)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, L - len(row) :], mask[r, L - len(row) :] = torch.tensor(row), True
    # the reference: each prompt alone, one forward without a cache, its last position
    want = torch.cat([model(torch.tensor([row])).logits[:, -1] for row in rows]).float()
    dec = get_decoder(model, B, L + 8, compile=False)
    for chunk in CHUNKS:
        spy = Spy()
        dec.prefill_plan = spy.plan
        got = dec.prefill(ids, mask, chunk)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"chunk {chunk}")
        per_forward = spy.calls[:: model.config.n_layers]  # every layer of a forward sees the same shapes
        assert sum(t for t, _ in per_forward) == L and max(t for t, _ in per_forward) <= chunk
        end = 0
        for t, n_keys in per_forward:  # keys: the positions written so far (16-aligned), not the whole cache
            end += t
            assert n_keys == min(-(-end // 16) * 16, dec.cache.max_len), (chunk, end, n_keys)
        assert dec.cache.length == L
    model.__dict__.pop("_smalto_decoder")


@torch.no_grad()
@pytest.mark.parametrize("spec", [ALIBI, ROPE_GQA], ids=["alibi", "rope"])
def test_greedy_tokens_do_not_depend_on_the_chunk(spec: dict) -> None:
    model = make_model(spec)
    outs = {
        c: [
            o.token_ids
            for o in generate(model, None, prompts(), max_new_tokens=6, temperature=0, prefill_chunk=c)
        ]
        for c in (1, 7, 2048)
    }
    assert outs[1] == outs[7] == outs[2048] and all(len(t) == 6 for t in outs[1])


def test_prefill_spans_keep_the_scores_of_a_chunk_within_the_budget() -> None:
    # MPT-7B (32 heads), one row, an 84,000-token prompt in a cache of 84,224 slots
    spans = list(prefill_spans(84_000, 2048, 84_224, 32))
    assert spans[0] == (0, 2048, 2048)
    assert [s[0] for s in spans[1:]] == [s[1] for s in spans[:-1]] and spans[-1][1] == 84_000
    assert all(32 * (end - start) * n_keys <= SDPA_BIAS_BUDGET for start, end, n_keys in spans)
    assert spans[-1][1] - spans[-1][0] <= 399  # 2^30 // (32 · 84,000)
    # many rows: the chunk stops shrinking at MIN_PREFILL_CHUNK (SDPA then splits its queries itself)
    many = [e - s for s, e, _ in prefill_spans(50_000, 2048, 50_000, 64 * 32)][:-1]
    assert min(many) == many[-1] == MIN_PREFILL_CHUNK


def smalto(*args: str) -> subprocess.CompletedProcess:
    return forkrun.run(
        [sys.executable, "-m", "smalto", *args], capture_output=True, text=True, timeout=180, cwd=REPO
    )


def test_prompt_file_is_one_prompt(tmp_path: Path, neox_tokenizer_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(d_model=32, n_heads=2, n_layers=1, vocab_size=50432, **ALIBI)
    model_dir = save_pretrained(MPTForCausalLM(cfg), tmp_path / "tiny", tokenizer=neox_tokenizer_dir)
    book = tmp_path / "book.txt"
    text = "Chapter 1\n\nIn my younger and more vulnerable years\nmy father gave me some advice.\n" * 12
    book.write_text(text, encoding="utf-8")
    from smalto.tokenizer import load_tokenizer

    n_tokens = len(load_tokenizer(neox_tokenizer_dir).encode(text))
    assert n_tokens > cfg.max_seq_len  # past the trained length: --max-seq-len makes the room
    from typer.testing import CliRunner

    from smalto.cli import app

    base = [
        "generate",
        str(model_dir),
        "--prompt-file",
        str(book),
        "-n",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(app, [*base, "--max-seq-len", "512", "--prefill-chunk", "64", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["prompt"] == text and row["prompt_tokens"] == n_tokens and row["completion_tokens"] == 4
    missing = CliRunner().invoke(app, [*base, "--prompt-file", str(tmp_path / "nope.txt")])
    assert isinstance(missing.exception, UserError) and "--prompt-file" in str(missing.exception)


def test_learned_positions_are_refused_past_their_table(tmp_path: Path, neox_tokenizer_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(d_model=32, n_heads=2, n_layers=1, vocab_size=50432, **LEARNED_POS)
    model_dir = save_pretrained(MPTForCausalLM(cfg), tmp_path / "wpe", tokenizer=neox_tokenizer_dir)
    r = smalto("generate", str(model_dir), "-p", "Hello", "--device", "cpu", "--max-seq-len", "160")
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "transformer.wpe.weight (80, 32) → (160, 32)" in err and "learned positions" in err
