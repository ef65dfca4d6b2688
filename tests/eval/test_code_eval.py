"""Code evaluation: llm-foundry's prompts, completion cut, test harness and pass@k, and the sandbox holding
hostile completions (each contained, failed, and the evaluation goes on)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket

import pytest

from smalto.errors import ConfigError
from smalto.eval.code_eval import Problem, build_problems, completion_code, judge_problems, pass_at_k
from smalto.eval.code_exec import missing_tool
from smalto.eval.runner import evaluate
from smalto.eval.sandbox import _UID_BASE, Limits, containment
from smalto.eval.tasks import TaskConfig, read_items, shipped_tasks
from tests import forkrun
from tests.eval.conftest import tiny_mpt


def _code_task(**kw) -> TaskConfig:
    return TaskConfig(
        label="he", dataset_uri="programming/human_eval.jsonl", icl_task_type="code_evaluation", **kw
    )


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (5, 2, 2), (4, 0, 1), (4, 4, 2), (20, 17, 4)]
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    """Chen et al.: 1 - C(n-c, k) / C(n, k)."""
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_literals():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - 3/10
    assert pass_at_k(3, 2, 2) == 1.0  # n - c < k


def test_completion_is_cut_where_the_function_ends():
    """llm-foundry: re.split(r'\\n[A-Za-z0-9#`]', generation)[0]."""
    assert completion_code("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert completion_code("    x = 1\n    return x\n# done") == "    x = 1\n    return x"
    assert completion_code("  return a;\n}\n```") == "  return a;\n}"
    assert completion_code("    return 2\n    \n") == "    return 2\n    \n"


def test_prompts_as_llm_foundry_builds_them(data_root, tokenizer):
    """llm-foundry's test_code_eval_sentpiece_dataloader (question_prelimiter 'Code start: \\n',
    continuation_delimiter '', prompt_string 'Please code:\\n'): every context ends with the item's prompt
    exactly, one 'Code start' per shot plus one, the prompt string once. The shipped tasks keep nothing but the
    prompt; llm-foundry's default continuation_delimiter ' ' would add a space after it."""
    items = read_items(_code_task(), data_root)
    i = next(j for j, it in enumerate(items) if it["task_id"] == "HumanEval/0")
    has_close = (
        "Code start: \nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) "
        '-> bool:\n    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
        "    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n"
        '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n'
    )
    for k, prompt_string in ((0, ""), (2, "Please code:\n")):
        task = _code_task(
            question_prelimiter="Code start: \n", continuation_delimiter="", prompt_string=prompt_string
        )
        problems, budget, _ = build_problems(task, items, k, tokenizer, 2048, None)
        text = tokenizer.decode(problems[i].context)
        assert text.endswith(has_close)
        assert text.count("Code start: \n") == k + 1
        assert text.count("Please code:\n") == (1 if prompt_string else 0)
        longest_solution = max(len(tokenizer(it["canonical_solution"])["input_ids"]) for it in items)
        assert budget == longest_solution + 10  # a 2048 context leaves room: min(answer + 10, ...)
    shipped = shipped_tasks()["human_eval"]
    problems, _, _ = build_problems(shipped, items, 0, tokenizer, 2048, 1)
    assert tokenizer.decode(problems[0].context) == items[0]["prompt"]
    default, _, _ = build_problems(_code_task(), items, 0, tokenizer, 2048, 1)
    assert tokenizer.decode(default[0].context) == items[0]["prompt"] + " "


def test_code_task_settings_are_checked():
    with pytest.raises(
        ConfigError, match=r"generations_per_sample \(1\) must be greater than or equal to pass_at_k"
    ):
        _code_task(pass_at_k=[1, 5])
    with pytest.raises(ConfigError, match="num_beams is no longer supported"):
        TaskConfig.from_dict(
            {"label": "x", "dataset_uri": "x", "icl_task_type": "code_evaluation", "num_beams": 5}
        )
    with pytest.raises(ConfigError, match=r"generation_kwargs\.nucleus"):
        _code_task(generation_kwargs={"nucleus": 0.9})


def _problem(item: dict, index: int = 0) -> Problem:
    return Problem(
        index=index,
        task_id=item["task_id"],
        context=[],
        prompt=item["prompt"],
        entry_point=item["entry_point"],
        test_inputs=item["test_inputs"],
        test_outputs=item["test_outputs"],
        language=item["language"],
    )


@pytest.mark.parametrize(
    ("uri", "wrong"),
    [
        ("human_eval.jsonl", "    return None\n"),
        ("processed_human_eval_cpp.jsonl", "}\n"),
        ("processed_human_eval_js.jsonl", "  return null;\n}\n"),
    ],
)
def test_canonical_solutions_pass_and_wrong_ones_fail(data_root, uri, wrong):
    """Each language's harness on real items: the canonical solution passes every test case, a wrong body
    fails; two samples, one passing: pass@1 0.5, pass@2 1.0. Without the language's tool the task is skipped,
    naming it."""
    task = _code_task(generations_per_sample=2, pass_at_k=[1, 2])
    item = json.loads((data_root / "programming" / uri).read_text().splitlines()[1])
    why = missing_tool(item["language"])
    if why is not None:
        assert why in ("g++ is not installed", "node is not installed")
        return
    rec = judge_problems(task, [_problem(item)], [[item["canonical_solution"], wrong]], Limits(), workers=2)[
        0
    ]
    assert rec["passed"] == [True, False]
    assert (rec["pass@1"], rec["pass@2"], rec["correct"]) == (0.5, 1.0, 0.5)


def test_hostile_completions_are_contained(data_root, tmp_path, monkeypatch):
    """Infinite loop, fork bomb, huge allocation, a write outside the working folder, reading a secret from the
    environment, a network connection: each fails (or is killed at the wall-clock limit), nothing escapes, and
    the honest completion after them still passes."""
    item = json.loads((data_root / "programming" / "human_eval.jsonl").read_text().splitlines()[0])
    monkeypatch.setenv("SMALTO_TEST_SECRET", "hunter2")
    outside = tmp_path / "escaped.txt"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    # each would pass (it ends with the canonical solution) if what it tries succeeded
    ok = item["canonical_solution"]
    body = "    import os, socket\n"
    hostile = {
        "infinite loop": "    while True:\n        pass\n",
        "fork bomb": "    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
        "huge allocation": "    x = bytearray(64 * 1024 ** 3)\n" + ok,
        "write outside": f"    open({str(outside)!r}, 'w').write('x')\n" + ok,
        "read secret": "    if os.environ.get('SMALTO_TEST_SECRET') != 'hunter2':\n        return None\n"
        + ok,
        "network": f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + ok,
    }
    gens = [[body + code] for code in hostile.values()] + [[item["canonical_solution"]]]
    problems = [_problem(item, i) for i in range(len(gens))]
    task = _code_task()
    records = judge_problems(task, problems, gens, Limits(wall_s=2, memory_mb=1024), workers=2)
    verdicts = dict(zip([*hostile, "honest"], [r["passed"][0] for r in records], strict=True))
    assert verdicts == {**dict.fromkeys(hostile, False), "honest": True}
    assert not outside.exists()
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing connected
    server.close()
    c = containment()
    if c.uid is not None and c.uid != 65534:  # every run's uid: no process left behind
        ps = forkrun.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()
        assert not [u for u in ps if _UID_BASE <= int(u) < _UID_BASE + 1000]
    # the secret exists here but not in the sandbox: the same check outside the sandbox passes
    assert os.environ["SMALTO_TEST_SECRET"] == "hunter2"


def test_a_code_task_end_to_end_and_skipped_when_it_cannot_run(data_root, tokenizer):
    """Sampling from a model, tests in the sandbox, pass@k per task; a context too short for the longest prompt
    skips the task with a named reason (llm-foundry's budget would be 0)."""
    task = TaskConfig.from_dict(
        {
            "label": "he_small",
            "dataset_uri": "programming/human_eval_return_simple.jsonl",
            "icl_task_type": "code_evaluation",
            "continuation_delimiter": "",
            "generations_per_sample": 2,
            "pass_at_k": [1, 2],
            "generation_kwargs": {"max_new_tokens": 4},
        }
    )
    from smalto.eval.tasks import Suite

    res = evaluate(
        tiny_mpt(max_seq_len=1024), tokenizer, Suite([task]), data_root=data_root, limit=1, log_samples=True
    )
    (t,) = res.tasks
    assert t.metrics == {"pass@1": 0.0, "pass@2": 0.0} and t.n == 1  # a random model writes no working code
    assert len(t.samples[0]["completions"]) == 2 and t.samples[0]["task_id"].startswith("HumanEval/")
    skipped: list[tuple[str, str]] = []
    res = evaluate(
        tiny_mpt(max_seq_len=128),
        tokenizer,
        Suite([shipped_tasks()["human_eval"]]),
        data_root=data_root,
        limit=1,
        on_skip=lambda key, why: skipped.append((key, why)),
    )
    assert res.tasks == [] and [k for k, _ in skipped] == ["human_eval/0-shot"]
    assert "leaves no room to generate within max_seq_len 128" in skipped[0][1]


def test_tools_are_named_when_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert missing_tool("c++") == "g++ is not installed"
    assert missing_tool("javascript") == "node is not installed"
    assert "not supported" in (missing_tool("rust") or "")
