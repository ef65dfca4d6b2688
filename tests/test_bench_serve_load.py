"""bench/serve_load.py: requests from a JSONL of real conversations (ShareGPT's or OpenAI's format) with the
lengths the real tokenizer gives; bad lines named by file and line; `--smoke --dataset` loads smalto serve and the
naive server over HTTP on CPU and writes its report."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

from tests import forkrun

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import serve_load  # noqa: E402

TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt-neox-20b"

ROWS = [
    {  # ShareGPT: the first human turn and the answer to it (a system-like first turn is skipped)
        "id": "a",
        "conversations": [
            {"from": "gpt", "value": "Hello, how can I help?"},
            {"from": "human", "value": "Write a haiku about the sea, please, with a title."},
            {"from": "gpt", "value": "Waves fold into foam under a grey sky"},
            {"from": "human", "value": "Another one"},
        ],
    },
    {  # OpenAI messages
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France? Answer in a sentence."},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    },
    {"conversations": [{"from": "human", "value": "no answer to this one"}]},  # no exchange: left out
    {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]
    },  # too short
]


@pytest.fixture(scope="module")
def tok():
    from smalto.tokenizer import load_tokenizer

    return load_tokenizer(TOKENIZER)


def write(path: Path, rows: list, extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def test_requests_are_first_exchanges_with_their_token_lengths(tok, tmp_path: Path) -> None:
    data = write(tmp_path / "conv.jsonl", ROWS, "\n")  # a blank line is skipped
    work = serve_load.dataset_work(data, tok, 5, 64, random.Random(0))
    # the GPT-NeoX tokenizer's ids of the two user turns, and the token counts of their answers
    haiku = ((10639, 247, 419, 38559, 670, 253, 6150, 13, 4496, 13, 342, 247, 4060, 15), 9)
    paris = ((1276, 310, 253, 5347, 273, 6181, 32, 37741, 275, 247, 6197, 15), 7)
    assert len(work) == 5 and {(tuple(p), n) for p, n in work} == {haiku, paris}
    # an exchange that does not fit the context is left out, not cut
    short = serve_load.dataset_work(data, tok, 2, 12 + 7, random.Random(0))  # 14 + 9 do not fit
    assert [(tuple(p), n) for p, n in short] == [paris, paris]


def test_a_bad_line_is_named(tok, tmp_path: Path) -> None:
    data = write(tmp_path / "bad.jsonl", ROWS[:1], '{"conversations": [oops\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: "):
        serve_load.dataset_work(data, tok, 4, 64, random.Random(0))
    write(data, [{"text": "no turns"}])
    with pytest.raises(
        SystemExit, match=r'bad\.jsonl:1: expected an object with a "conversations" or "messages"'
    ):
        serve_load.dataset_work(data, tok, 4, 64, random.Random(0))
    write(data, ROWS[2:])
    with pytest.raises(SystemExit, match="no conversation with a user turn and an answer"):
        serve_load.dataset_work(data, tok, 4, 64, random.Random(0))


def test_smoke_with_a_dataset(tmp_path: Path) -> None:
    data = write(tmp_path / "conv.jsonl", ROWS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = forkrun.run(
        [sys.executable, str(REPO / "bench" / "serve_load.py"), "--smoke", "--dataset", str(data),
         "--tokenizer", str(TOKENIZER), "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6 requests from" in p.stdout and "offline smalto.generate at batch 4" in p.stdout
    report = json.loads((tmp_path / "serve_load.json").read_text())
    assert set(report["servers"]) == {"smalto serve", "naive (transformers generate, one at a time)"}
    for rows in report["servers"].values():
        for row in rows:
            assert row["output_tokens_per_s"] > 0 and row["ttft"]["p50"] > 0
    assert [r["rate"] for r in report["servers"]["smalto serve"]] == [4.0, float("inf")]
