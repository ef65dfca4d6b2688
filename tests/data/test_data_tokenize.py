"""`smalto data`: raw sources → shards, the exact token stream back through the loader, and every bad input."""

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from smalto.data.stream import DataConfig, build_loader
from smalto.data.tokenize import TokenizeConfig, tokenize_to_shards
from tests import forkrun
from tests.data.conftest import run_cli


def docs_for(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "数据", "tokens", "shard", "\n"]
    return [f"doc {i} " + " ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for i in range(n)]


def encode_docs(tok, docs, eos_id, bos_id=None):
    pre = [bos_id] if bos_id is not None else []
    return [np.array(pre + tok.encode(d, add_special_tokens=False).ids + [eos_id]) for d in docs]


def stream_all(out: Path, seq_len: int, split: str = "train") -> list[np.ndarray]:
    cfg = DataConfig.from_dict(
        {"sources": [{"path": str(out), "split": split}], "seq_len": seq_len, "shuffle": False}
    )
    loader = build_loader(cfg, micro_batch_size=1, global_batch_size=1, epochs=1)
    return [b for b in loader]


def test_text_folder_to_loader_gives_back_the_token_stream(tmp_path, tokenizer_dir, tok, eos_id):
    docs = docs_for(120)
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):  # one document per file, names sort in document order
        (folder / ("sub" if i % 2 else "") / f"{i:04d}.txt").write_text(d)
    files = sorted(str(p) for p in folder.rglob("*.txt"))
    order = [int(Path(f).stem) for f in files]
    out = tmp_path / "out"
    res = run_cli("data", folder, "-o", out, "-t", tokenizer_dir, "--seq-len", 32, "--no-progress")
    assert res.returncode == 0, res.stderr.decode()
    expected = np.concatenate(encode_docs(tok, [docs[i] for i in order], eos_id))
    batches = stream_all(out, 32)
    got = np.concatenate([b["input_ids"][0].numpy() for b in batches])
    assert len(got) == len(expected) // 32 * 32
    np.testing.assert_array_equal(got, expected[: len(got)])
    # sequence_id restarts at every row and increments right after each EOS
    for b in batches:
        ids, seq = b["input_ids"][0].numpy(), b["sequence_id"][0].numpy()
        assert seq[0] == 0
        assert all(seq[t + 1] == seq[t] + (ids[t] == eos_id) for t in range(len(ids) - 1))
        assert (b["labels"] == b["input_ids"]).all()
    meta = json.loads((out / "smalto_data.json").read_text())
    assert meta["tokenizer"]["eos_id"] == eos_id
    assert (
        meta["tokenizer"]["sha256"]
        == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert meta["documents"] == len(docs) and meta["tokens"] == len(expected)
    assert meta["sources"][0]["splits"]["train"]["tokens"] == len(got)
    f0 = meta["sources"][0]["files"][0]
    assert f0["sha256"] == hashlib.sha256(Path(f0["path"]).read_bytes()).hexdigest()


def test_no_wrap_keeps_documents_whole_with_bos(tmp_path, tokenizer_dir, tok, eos_id):
    docs = docs_for(30, seed=3)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    tokenize_to_shards(
        TokenizeConfig(
            sources=[str(tmp_path / "d.jsonl")],
            out=tmp_path / "o",
            tokenizer=str(tokenizer_dir),
            seq_len=40,
            wrap=False,
            bos=True,
            text_field="body",
            progress=False,
        )
    )
    expected = encode_docs(tok, docs, eos_id, bos_id=eos_id)  # neox's BOS is <|endoftext|> too
    batches = stream_all(tmp_path / "o", 40)
    assert len(batches) == len(docs)
    for b, e in zip(batches, expected, strict=True):
        e = e[:40]
        row, labels, seq = b["input_ids"][0].numpy(), b["labels"][0].numpy(), b["sequence_id"][0].numpy()
        np.testing.assert_array_equal(row[: len(e)], e)
        assert (labels[len(e) :] == -100).all() and (seq[len(e) :] == -1).all()


def test_formats_stdin_and_named_sources(tmp_path, tokenizer_dir, tok, eos_id):
    docs = docs_for(40, seed=5)
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in docs[:10]]))
    with open(tmp_path / "b.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, d] for i, d in enumerate(docs[10:20])])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[20:30]}), tmp_path / "c.parquet")
    stdin = "".join(d.replace("\n", " ") + "\n" for d in docs[30:]).encode()
    out = tmp_path / "mix"
    args = [
        "data",
        f"js={tmp_path / 'a.json'}",
        "-s",
        f"tab={tmp_path / 'b.csv'}",
        "-s",
        f"pq={tmp_path / 'c.parquet'}",
        "-s",
        "in=-",
    ]
    res = run_cli(*args, "-o", out, "-t", tokenizer_dir, "--seq-len", 8, "--no-progress", stdin=stdin)
    assert res.returncode == 0, res.stderr.decode()
    texts = {
        "js": docs[:10],
        "tab": docs[10:20],
        "pq": docs[20:30],
        "in": [d.replace("\n", " ") for d in docs[30:]],
    }
    for name, ds in texts.items():
        expected = np.concatenate(encode_docs(tok, ds, eos_id))
        got = np.concatenate([b["input_ids"][0].numpy() for b in stream_all(out / name, 8)])
        np.testing.assert_array_equal(got, expected[: len(got)])
        assert len(expected) - len(got) < 8


def test_val_split_is_stable_and_independent_of_workers(tmp_path, tokenizer_dir):
    docs = docs_for(400, seed=7)
    (tmp_path / "d.txt").write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}"
        cfg = TokenizeConfig(
            sources=[str(tmp_path / "d.txt")],
            out=out,
            tokenizer=str(tokenizer_dir),
            seq_len=16,
            format="lines",
            val_fraction=0.2,
            workers=workers,
            progress=False,
        )
        meta = tokenize_to_shards(cfg)
        outs.append(out)
    splits = meta["sources"][0]["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 400
    assert 40 < splits["val"]["documents"] < 120  # 20% of 400 within a wide binomial margin
    for split in ("train", "val"):
        a = sorted((outs[0] / split).iterdir())
        b = sorted((outs[1] / split).iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_on_error_skip_counts_bad_records(tmp_path, tokenizer_dir):
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"txt": "wrong field"}),
        json.dumps({"text": "good two"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    res = run_cli(
        "data",
        tmp_path / "d.jsonl",
        "-o",
        tmp_path / "o",
        "-t",
        tokenizer_dir,
        "--seq-len",
        4,
        "--on-error",
        "skip",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr.decode()
    assert "skipped 2 bad records" in res.stderr.decode()
    assert json.loads((tmp_path / "o" / "smalto_data.json").read_text())["documents"] == 2


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp / "badutf8.txt").write_bytes(b"fine line\nbad \xff\xfe byte\n")
    (tmp / "badutf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    (tmp / "notstr.jsonl").write_text('{"text": 3}\n')
    (tmp / "empty.txt").write_text("")
    (tmp / "exists").mkdir()
    return {
        "malformed json": (["badjson.jsonl"], "badjson.jsonl:2: not valid JSON"),
        "undecodable lines": (["badutf8.txt", "--format", "lines"], "badutf8.txt:2: not valid UTF-8"),
        "undecodable text file": (["badutf8.txt"], "badutf8.txt:2: not valid UTF-8"),
        "undecodable jsonl": (["badutf8.jsonl"], "badutf8.jsonl:2: not valid UTF-8"),
        "missing field": (["nofield.jsonl"], "nofield.jsonl:2: no field 'text'"),
        "field not a string": (["notstr.jsonl"], "notstr.jsonl:1: field 'text' is int"),
        "empty input": (["empty.txt"], "the input is empty"),
        "no such file": (["missing.txt"], "no input files found"),
        "existing output": (["badjson.jsonl", "--out-name", "exists"], "already exists; pass --overwrite"),
        "bad compression": (
            ["nofield.jsonl", "--compression", "gzip"],
            "compression 'gzip' is not supported",
        ),
        "seq len": (["nofield.jsonl", "--seq-len", "1"], "--seq-len must be at least 2"),
    }


BAD_CASES = [
    "malformed json", "undecodable lines", "undecodable text file", "undecodable jsonl", "missing field",
    "field not a string", "empty input", "no such file", "existing output", "bad compression", "seq len",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_message_and_leaves_nothing(tmp_path, tokenizer_dir, case):
    args, message = _bad_inputs(tmp_path)[case]
    out_name = "out"
    if "--out-name" in args:
        out_name = args[args.index("--out-name") + 1]
        args = args[: args.index("--out-name")]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli("data", *args, "-o", out_name, "-t", tokenizer_dir, "--no-progress", cwd=tmp_path)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no leftover temporary folder


def test_missing_zstandard_is_a_clear_error(tmp_path, tokenizer_dir):
    (tmp_path / "d.txt").write_text("some text " * 50)
    code = "import sys; sys.modules['zstandard'] = None; sys.argv[0] = 'smalto'; from smalto.cli import main; main()"

    res = forkrun.run(
        [sys.executable, "-c", code, "data", "d.txt", "-o", "o", "-t", str(tokenizer_dir), "--compression", "zstd", "--seq-len", "8"],
        cwd=tmp_path, capture_output=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "zstandard" in res.stderr.decode()
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_output(tmp_path, tokenizer_dir):
    (tmp_path / "d.txt").write_text("first version " * 40)
    for _ in range(2):
        res = run_cli(
            "data",
            tmp_path / "d.txt",
            "-o",
            tmp_path / "o",
            "-t",
            tokenizer_dir,
            "--seq-len",
            8,
            "--overwrite",
            "--no-progress",
        )
        assert res.returncode == 0, res.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "o"]
