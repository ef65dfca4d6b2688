"""Behaviours pinned to llm-foundry's, with literal expected values taken from llm-foundry or its data files
(never from smalto's own output): per-category few-shot pools, the un-normalized generation comparison, the
shipped task settings, decoding without special tokens, and the generation budget on unstripped answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smalto.eval.prompts import build_items, build_prompts, max_answer_tokens
from smalto.eval.runner import prepare
from smalto.eval.scorer import decode_generation
from smalto.eval.scoring import generation_correct
from smalto.eval.tasks import TaskConfig, read_items, shipped_tasks

# ---------------------------------------------------------------- 1. has_categories: shots from the same category


def test_jeopardy_shots_come_from_the_items_category(data_root):
    """llm-foundry splits a has_categories file by `category` and builds each as its own dataset with a fresh
    random.Random(fewshot_random_seed). Its own test pins the first american_history item at 1 shot beginning
    'AMERICAN HISTORY: Witchcraft trials … Answer: Salem'; the rest is the two items' text in
    world_knowledge/jeopardy_all.jsonl with the shipped delimiters ("\\nAnswer: ", example delimiter "\\n")."""
    task = shipped_tasks()["jeopardy"]
    items = read_items(task, data_root)
    first = next(i for i, it in enumerate(items) if it["category"] == "american_history")
    preamble, contexts = build_prompts(task, items, 1)[first]
    assert preamble + contexts[0] == (
        "AMERICAN HISTORY: Witchcraft trials held in this town in 1692 led to the hangings of 19 people\n"
        "Answer: Salem\n"
        "AMERICAN HISTORY: On May 29, 1765 Patrick Henrys Stamp Act protest was interrupted with this one word\n"
        "Answer:"
    )


def test_category_pools_with_a_limit_and_the_task_average(tmp_path):
    """Each category draws only from itself; a prefix of the file (--limit) gets the prompts the whole file
    gives it; items missing `category` are named."""
    rows = [{"context": f"{c}{i}", "continuation": "x", "category": c} for i, c in enumerate("abab")]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskConfig(
        label="c", dataset_uri=str(path), icl_task_type="language_modeling", has_categories=True
    )
    items = read_items(task, None)
    full = build_prompts(task, items, 1)
    # two items per category: the only other item of the same category is the shot
    assert [p for p, _ in full] == ["a2 x", "b3 x", "a0 x", "b1 x"]
    assert build_prompts(task, items, 1, limit=3) == full[:3]
    path.write_text(json.dumps({"context": "c", "continuation": "x"}) + "\n")
    with pytest.raises(Exception, match="category"):
        build_prompts(task, read_items(task, None), 1)


# ---------------------------------------------------------------- 2. do_normalization: false still strips


@pytest.mark.parametrize(
    ("output", "alias", "correct"),
    [(" 18", "18", True), ("18 apples", "18", True), ("1", "18", False), ("18", " 18 ", True)],
)
def test_unnormalized_generation_is_stripped_then_startswith(output, alias, correct):
    """llm-foundry's InContextLearningGenerationExactMatchAccuracy: without normalization the answer and the
    labels are still .strip()ped, then compared with startswith."""
    task = TaskConfig(
        label="g", dataset_uri="x", icl_task_type="generation_task_with_answers", do_normalization=False
    )
    assert generation_correct(output, [alias], task)[0] is correct


# ---------------------------------------------------------------- 3. shipped settings = llm-foundry's tasks_v0.3

_P = "eval/local_data/"
_GEN = {
    "cot_delimiter": "The answer is ",
    "continuation_delimiter": "\n\nA:",
    "do_normalization": False,
    "early_stopping_criteria": ["\n\n", "Question:"],
}
_ANSWER = {"continuation_delimiter": "\nAnswer: "}
# label: (dataset_uri, num_fewshot, icl_task_type, other keys llm-foundry sets)
LLM_FOUNDRY_TASKS_V03: dict[str, tuple[str, list[int], str, dict]] = {
    "gsm8k": (
        _P + "symbolic_problem_solving/gsm8k_prepended_8shot.jsonl",
        [0],
        "question_answering",
        {**_GEN, "question_prelimiter": ""},
    ),
    "triviaqa_sm_sub": (
        _P + "world_knowledge/triviaqa_sm_sub.jsonl",
        [3],
        "question_answering",
        {"do_normalization": True},
    ),
    "svamp": (
        _P + "symbolic_problem_solving/svamp.jsonl",
        [5],
        "question_answering",
        {**_GEN, "question_prelimiter": "Question: "},
    ),
    "jeopardy": (
        _P + "world_knowledge/jeopardy_all.jsonl",
        [3],
        "language_modeling",
        {**_ANSWER, "has_categories": True},
    ),
    "bigbench_qa_wikidata": (_P + "world_knowledge/bigbench_qa_wikidata.jsonl", [3], "language_modeling", {}),
    "arc_easy": (_P + "world_knowledge/arc_easy.jsonl", [3], "multiple_choice", _ANSWER),
    "arc_challenge": (_P + "world_knowledge/arc_challenge.jsonl", [3, 25], "multiple_choice", _ANSWER),
    "mmlu": (_P + "world_knowledge/mmlu.jsonl", [5], "multiple_choice", {**_ANSWER, "has_categories": True}),
    "copa": (_P + "commonsense_reasoning/copa.jsonl", [0], "multiple_choice", {}),
    "siqa": (_P + "commonsense_reasoning/siqa.jsonl", [3], "multiple_choice", {}),
    "commonsense_qa": (_P + "commonsense_reasoning/commonsense_qa.jsonl", [0], "multiple_choice", {}),
    "piqa": (_P + "commonsense_reasoning/piqa.jsonl", [0], "multiple_choice", _ANSWER),
    "openbook_qa": (_P + "commonsense_reasoning/openbook_qa.jsonl", [10], "multiple_choice", {}),
    "bigbench_strange_stories": (
        _P + "commonsense_reasoning/bigbench_strange_stories.jsonl",
        [0],
        "multiple_choice",
        {},
    ),
    "bigbench_strategy_qa": (
        _P + "commonsense_reasoning/bigbench_strategy_qa.jsonl",
        [0],
        "multiple_choice",
        {},
    ),
    "bigbench_dyck_languages": (
        _P + "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
        [5],
        "language_modeling",
        {},
    ),
    "lambada_openai": (_P + "language_understanding/lambada_openai.jsonl", [0], "language_modeling", {}),
    "hellaswag": (_P + "language_understanding/hellaswag.jsonl", [0, 10], "multiple_choice", {}),
    "winograd": (_P + "language_understanding/winograd_wsc.jsonl", [3], "schema", {}),
    "winogrande": (_P + "language_understanding/winogrande.jsonl", [5], "schema", {}),
    "bigbench_elementary_math_qa": (
        _P + "symbolic_problem_solving/bigbench_elementary_math_qa.jsonl",
        [1],
        "multiple_choice",
        {},
    ),
    "agi_eval_lsat_ar": (_P + "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", [5], "multiple_choice", {}),
    "bigbench_cs_algorithms": (
        _P + "symbolic_problem_solving/bigbench_cs_algorithms.jsonl",
        [10],
        "language_modeling",
        {},
    ),
    "bigbench_operators": (
        _P + "symbolic_problem_solving/bigbench_operators.jsonl",
        [3],
        "language_modeling",
        {},
    ),
    "simple_arithmetic_nospaces": (
        _P + "symbolic_problem_solving/simple_arithmetic_nospaces.jsonl",
        [5],
        "language_modeling",
        {},
    ),
    "simple_arithmetic_withspaces": (
        _P + "symbolic_problem_solving/simple_arithmetic_withspaces.jsonl",
        [5],
        "language_modeling",
        {},
    ),
    "squad": (_P + "reading_comprehension/squad.jsonl", [3], "language_modeling", {}),
    "agi_eval_lsat_rc": (_P + "reading_comprehension/agi_eval_lsat_rc.jsonl", [5], "multiple_choice", {}),
    "agi_eval_lsat_lr": (_P + "reading_comprehension/agi_eval_lsat_lr.jsonl", [5], "multiple_choice", {}),
    "coqa": (_P + "reading_comprehension/coqa.jsonl", [0], "language_modeling", {}),
    "boolq": (_P + "reading_comprehension/boolq.jsonl", [0], "multiple_choice", _ANSWER),
    "agi_eval_sat_en": (_P + "reading_comprehension/agi_eval_sat_en.jsonl", [5], "multiple_choice", {}),
}
# not in shared/icl_data (docs/eval.md)
NOT_SHIPPED = {"mmlu", "hellaswag", "squad", "coqa", "bigbench_elementary_math_qa"}
SMOKE_SETS = {"lambada_openai_small", "jeopardy_small", "triviaqa_small"}
# llm-foundry's tasks_v0.3_with_code.yaml (commit 0c501b46a5d54051fd745bdbea2249ea43c6c72d): label → file under
# programming/; every one num_fewshot [0], pass_at_k 1, batch_size 1, icl_task_type code_evaluation
CODE_TASKS = {
    "human_eval": "human_eval.jsonl",
    "human_eval_cpp": "processed_human_eval_cpp.jsonl",
    "human_eval_js": "processed_human_eval_js.jsonl",
    "human_eval_return_simple": "human_eval_return_simple.jsonl",
    "human_eval_return_complex": "human_eval_return_complex.jsonl",
    "human_eval_25": "human_eval-0.25.jsonl",
    "human_eval_50": "human_eval-0.5.jsonl",
    "human_eval_75": "human_eval-0.75.jsonl",
}


def test_shipped_tasks_equal_llm_foundry_tasks_v03():
    """Every shipped task, key by key, against llm-foundry's scripts/eval/yamls/tasks_v0.3.yaml
    (github.com/mosaicml/llm-foundry, the version at commit 9e31ec02af722cda6824172a6d91d807da2e3dd3, the one
    that sets do_normalization; its `question_answering` type is what llm-foundry later named
    `generation_task_with_answers`). A key llm-foundry leaves unset must hold llm-foundry's default.
    Another stored version of that file (commit 0cafbab78f18445e333f7fe9309c65db2044c4d5) types these tasks
    generation_task_with_answers, gives triviaqa_sm_sub `post_processing_funcs: [qa_normalization]` and does not
    set do_normalization on gsm8k and svamp; the values here follow the version that sets it."""
    shipped = shipped_tasks()
    assert set(shipped) == (set(LLM_FOUNDRY_TASKS_V03) - NOT_SHIPPED) | SMOKE_SETS | set(CODE_TASKS)
    defaults = TaskConfig(label="d", dataset_uri="d", icl_task_type="language_modeling")
    optional = (
        "continuation_delimiter",
        "question_prelimiter",
        "cot_delimiter",
        "has_categories",
        "do_normalization",
        "early_stopping_criteria",
        "prompt_string",
        "example_delimiter",
        "fewshot_random_seed",
    )
    for label, (uri, shots, fmt, keys) in LLM_FOUNDRY_TASKS_V03.items():
        if label in NOT_SHIPPED:
            continue
        t = shipped[label]
        fmt = {"question_answering": "generation_task_with_answers"}.get(fmt, fmt)
        assert (t.dataset_uri, t.num_fewshot, t.icl_task_type) == (uri.removeprefix(_P), shots, fmt), label
        for key in optional:
            assert getattr(t, key) == keys.get(key, getattr(defaults, key)), (label, key)


def test_shipped_code_tasks_equal_llm_foundry_tasks_v03_with_code():
    """Key by key against tasks_v0.3_with_code.yaml, except three documented differences: num_beams: 5 is left
    out (llm-foundry's own _validate_cfg refuses a top-level num_beams), so is batch_size: 1 (a memory setting),
    and continuation_delimiter is "" (the YAML leaves llm-foundry's default " ", which the completion, appended to
    the raw prompt, does not keep)."""
    shipped = shipped_tasks()
    for label, uri in CODE_TASKS.items():
        t = shipped[label]
        assert (t.dataset_uri, t.num_fewshot, t.icl_task_type) == (
            f"programming/{uri}",
            [0],
            "code_evaluation",
        )
        assert (t.pass_at_k, t.generations_per_sample, t.generation_kwargs) == (1, 1, {})
        assert t.batch_size is None  # llm-foundry sets 1 (memory); problems are sampled in batches
        assert (t.prompt_string, t.question_prelimiter, t.example_delimiter) == ("", "", "\n")
        assert t.continuation_delimiter == ""


# ---------------------------------------------------------------- 4. decoding and the generation budget


def test_generations_are_decoded_without_special_tokens(tokenizer):
    """Composer's HuggingFaceModel decodes generations with skip_special_tokens=True."""
    ids = tokenizer("18", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert tokenizer.decode([*ids, eos]) == "18<|endoftext|>"  # what keeping them gave
    assert decode_generation(tokenizer, [*ids, eos, *ids]) == "1818"


def test_generation_budget_counts_the_unstripped_answers(tmp_path, tokenizer):
    """llm-foundry's _get_max_answer_length tokenizes answer and aliases in read_dataset, before strip_data:
    "  Paris  " is longer than "Paris" in tokens, and that length is the budget."""
    path = tmp_path / "g.jsonl"
    row = {"context": "Capital of France?", "answer": "  Paris  ", "aliases": ["Paris"]}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": "Paris"}) + "\n")
    task = TaskConfig(label="g", dataset_uri=str(path), icl_task_type="generation_task_with_answers")
    unstripped = len(tokenizer("  Paris  ")["input_ids"])
    assert unstripped > len(tokenizer("Paris")["input_ids"])
    _items, budget = prepare(task, 0, tokenizer, 64, Path(tmp_path), None)
    assert budget == unstripped
    assert max_answer_tokens(task, read_items(task, None, strip=False), tokenizer) == unstripped
    # the context keeps room for that budget
    long = build_items(task, read_items(task, None), 0, tokenizer, 8, answer_budget=unstripped)
    assert len(long[0].gen_context or []) == 8 - unstripped
