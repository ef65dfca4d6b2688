"""Few-shot prompts are byte-for-byte what the task YAML asks for; shots are seeded, exclude the item, and the
left context is what gets cut."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from smalto.eval.prompts import build_items, build_prompts, fewshot_indices
from smalto.eval.tasks import TaskConfig, read_items


def _task(tmp_path: Path, fmt: str, rows: list[dict], yaml_text: str) -> TaskConfig:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = yaml.safe_load(yaml_text)
    return TaskConfig.from_dict(
        {"label": "t", "dataset_uri": str(tmp_path / "d.jsonl"), "icl_task_type": fmt, **d}
    )


YAML = """
num_fewshot: [3]
prompt_string: "P:"
example_delimiter: "##"
continuation_delimiter: " => "
question_prelimiter: "Q: "
"""


def test_language_modeling_prompt_bytes(tmp_path):
    rows = [{"context": f" c{i} ", "continuation": f"a{i}"} for i in range(4)]
    task = _task(tmp_path, "language_modeling", rows, YAML)
    items = read_items(task, None)
    # 3 shots out of 4 items: every other item, in increasing order (the set order llm-foundry iterates)
    (pre, ctx), *_ = build_prompts(task, items, 3)
    assert pre + ctx[0] == "P:##Q: c1 => a1##Q: c2 => a2##Q: c3 => a3##Q: c0 =>"
    pre, ctx = build_prompts(task, items, 3)[2]
    assert pre + ctx[0] == "P:##Q: c0 => a0##Q: c1 => a1##Q: c3 => a3##Q: c2 =>"


def test_zero_shot_and_no_prompt_string(tmp_path):
    rows = [
        {"query": "Why?", "choices": ["x", "yy"], "gold": 1},
        {"query": "How?", "choices": ["z", "w"], "gold": 0},
    ]
    task = _task(tmp_path, "multiple_choice", rows, 'continuation_delimiter: "\\nAnswer: "')
    items = read_items(task, None)
    assert build_prompts(task, items, 0)[0] == ("", ["Why?\nAnswer:"])
    pre, ctx = build_prompts(task, items, 1)[0]
    # nothing precedes the first shot, so no example delimiter before it; the item's own context gets one
    assert pre + ctx[0] == "How?\nAnswer: z\nWhy?\nAnswer:"


def test_schema_prompt_bytes(tmp_path):
    rows = [
        {"context_options": [f"A{i}", f"B{i}"], "continuation": f"end{i}.", "gold": i % 2} for i in range(2)
    ]
    task = _task(
        tmp_path, "schema", rows, 'num_fewshot: [1]\nexample_delimiter: "\\n"\nquestion_prelimiter: "S "'
    )
    pre, ctx = build_prompts(task, read_items(task, None), 1)[0]
    assert pre == "S B1 end1."
    assert ctx == [
        "S \nA0",
        "S \nB0",
    ]  # llm-foundry puts the prelimiter before the delimiter; the delimiter " " is stripped


def test_generation_prompt_with_chain_of_thought(tmp_path):
    rows = [{"context": f"q{i}", "answer": f"{i}", "chain_of_thought": f"think {i}."} for i in range(2)]
    task = _task(
        tmp_path,
        "generation_task_with_answers",
        rows,
        'continuation_delimiter: "\\nA: "\ncot_delimiter: " The answer is "\nquestion_prelimiter: "Question: "',
    )
    pre, ctx = build_prompts(task, read_items(task, None), 1)[1]
    assert pre + ctx[0] == "Question: q0\nA: think 0. The answer is 0\nQuestion: q1\nA:"


def test_fewshot_draws_are_seeded_distinct_and_exclude_the_item(tmp_path, data_root):
    import random

    rng_a, rng_b = random.Random(1234), random.Random(1234)
    for i in range(50):
        a, b = fewshot_indices(100, 5, i, rng_a), fewshot_indices(100, 5, i, rng_b)
        assert a == b and len(set(a)) == 5 and i not in a and all(0 <= j < 100 for j in a)
    task = TaskConfig(
        label="arc_easy",
        dataset_uri="world_knowledge/arc_easy.jsonl",
        icl_task_type="multiple_choice",
        continuation_delimiter="\nAnswer: ",
    )
    items = read_items(task, data_root)
    prompts = build_prompts(task, items, 3, limit=20)
    assert prompts == build_prompts(task, items, 3, limit=20)
    shots_seen = set()
    for i, (pre, _) in enumerate(prompts):
        shots = [
            j for j, it in enumerate(items) if f"{it['query']}\nAnswer: {it['choices'][it['gold']]}" in pre
        ]
        assert len(shots) == 3 and i not in shots
        shots_seen.add(tuple(shots))
    assert len(shots_seen) > 1  # shots differ between items


def test_long_context_loses_its_left_end(tokenizer, data_root):
    task = TaskConfig(
        label="lambada",
        dataset_uri="language_understanding/lambada_openai_small.jsonl",
        icl_task_type="language_modeling",
    )
    items = read_items(task, data_root)
    it = build_items(task, items, 0, tokenizer, max_seq_len=16)[0]
    (req,) = it.requests
    full = tokenizer(items[0]["context"], add_special_tokens=False)["input_ids"]
    cont = tokenizer(" " + items[0]["continuation"], add_special_tokens=False)["input_ids"]
    assert req.continuation == cont
    assert req.context == full[-(16 - len(cont)) :]
