"""bench/quant_quality.py: the corpus it builds from the ICL files (the GPU run itself is the lead's; `--smoke`
runs every step on CPU, minutes on a busy 2-core machine, so it is not run here)."""

import hashlib
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quant_quality", REPO / "bench" / "quant_quality.py")
assert _spec is not None and _spec.loader is not None
qq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qq)


def test_document_of_each_icl_format():
    assert qq.document({"context": "The cat sat on the", "continuation": "mat"}) == "The cat sat on the mat"
    assert (
        qq.document({"query": "Passage: A.\nQuestion: is it?", "choices": ["yes", "no"], "gold": 1})
        == "Passage: A.\nQuestion: is it? no"
    )
    row = {
        "context_options": ["Ann helped Bo so Ann", "Ann helped Bo so Bo"],
        "continuation": "was thanked.",
        "gold": 1,
    }
    assert qq.document(row) == "Ann helped Bo so Bo was thanked."
    row = {"context": "2 + 2?", "chain_of_thought": "Two and two.", "answer": "4"}
    assert qq.document(row) == "2 + 2?\nTwo and two.\n4"
    assert (
        qq.document({"context": "Q: capital of France?\nA:", "answer": "Paris"})
        == "Q: capital of France?\nA: Paris"
    )
    row = {"prompt": "def f():\n", "canonical_solution": "    return 1\n", "task_id": "x"}
    assert qq.document(row) == "def f():\n    return 1\n"


def test_dedupe_drops_repeated_passages_and_documents():
    seen: set[bytes] = set()
    passage = "Passage: " + "a long shared passage " * 3
    assert qq._dedupe(passage + "\nQ: first question here?", seen) == passage + "\nQ: first question here?"
    assert qq._dedupe(passage + "\nQ: second question, longer?", seen) == "Q: second question, longer?"
    assert qq._dedupe(passage, seen) is None  # nothing new
    assert qq._dedupe("Q: second question, longer?", seen) is None  # the same document again
    assert qq._dedupe("short", seen) is None


def test_build_corpus(tmp_path, shared_dir, neox_tokenizer_dir):
    meta = qq.build_corpus(tmp_path, shared_dir / "icl_data", neox_tokenizer_dir)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15e6
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == [
        "corpus.json",
        "icl/commonsense_reasoning/piqa.jsonl",
        "icl/world_knowledge/arc_easy.jsonl",
        "text.jsonl",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ]
    body = (tmp_path / "text.jsonl").read_bytes()
    assert meta["sha256"] == hashlib.sha256(body).hexdigest() and meta["bytes"] == len(body)
    docs = [
        json.loads(line)["text"] for line in body.decode().split("\n")[:-1]
    ]  # not splitlines: text holds U+2028
    assert len(docs) == meta["documents"] > 40_000
    assert sum(s["documents"] for s in meta["sources"].values()) == len(docs)
    # every long paragraph once
    paras = [p.strip() for d in docs for p in d.split("\n") if len(p.strip()) >= 40]
    assert len(paras) == len(set(paras))
    # the first LAMBADA passage, with its last word
    first = json.loads(
        (shared_dir / "icl_data/language_understanding/lambada_openai.jsonl").open().readline()
    )
    assert docs[0] == f"{first['context']} {first['continuation']}"
    # the scored ICL tasks are held out: none of their questions is a paragraph of the corpus
    para_set = set(paras)
    for name in ("commonsense_reasoning/piqa.jsonl", "world_knowledge/arc_easy.jsonl"):
        rows = [json.loads(x) for x in (shared_dir / "icl_data" / name).read_text().splitlines()]
        questions = [r["query"].split("\n")[0].strip() for r in rows]
        assert sum(q in para_set for q in questions if len(q) >= 40) == 0, name
