"""Task files, names and YAMLs: every mistake names what to fix."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import yaml

from smalto.errors import ConfigError, DataError
from smalto.eval.gauntlet import score_gauntlet
from smalto.eval.tasks import (
    FORMATS,
    TaskConfig,
    load_yaml,
    read_items,
    resolve_data_root,
    resolve_tasks,
    shipped_tasks,
)


def test_every_shipped_task_reads_its_file(data_root):
    tasks = shipped_tasks()
    assert {"arc_easy", "copa", "winogrande", "lambada_openai", "gsm8k", "jeopardy"} <= set(tasks)
    for t in tasks.values():
        items = read_items(t, data_root)
        assert items, t.label
        for i, item in enumerate(items):
            assert set(FORMATS[t.icl_task_type]) <= item.keys(), f"{t.label} item {i}: {sorted(item)}"
            options = {"multiple_choice": "choices", "schema": "context_options"}.get(t.icl_task_type)
            if options:
                assert isinstance(item["gold"], int) and 0 <= item["gold"] < len(item[options]), (t.label, i)
            if t.icl_task_type == "generation_task_with_answers":
                assert isinstance(item["answer"], str) and item["answer"].strip(), (t.label, i)


# the header of gauntlet_v0.3.yaml: llm-foundry's benchmarks whose data is not in ../shared/icl_data
MISSING_BENCHMARKS = {"mmlu", "hellaswag", "bigbench_elementary_math_qa", "squad", "coqa"}


def test_gauntlet_suite_resolves(data_root):
    doc = yaml.safe_load(resources.files("smalto.eval").joinpath("tasks", "gauntlet_v0.3.yaml").read_text())
    benchmarks = [b["name"] for c in doc["eval_gauntlet"]["categories"] for b in c["benchmarks"]]
    expected = set(benchmarks) - MISSING_BENCHMARKS
    assert len(set(benchmarks)) == len(benchmarks) and expected == set(
        benchmarks
    )  # the file already drops them
    suite = resolve_tasks(["gauntlet"])
    assert suite.gauntlet is not None
    assert sorted(t.label for t in suite.tasks) == sorted(expected)
    assert all(t.path(data_root).is_file() for t in suite.tasks)


def test_missing_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(
        json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
        + "\n"
        + json.dumps({"query": "q", "gold": 1})
        + "\n"
    )
    task = TaskConfig(label="bad", dataset_uri=str(f), icl_task_type="multiple_choice")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'choices'"):
        read_items(task, None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:1: not valid JSON"),
        (json.dumps({"query": "q", "choices": ["a"], "gold": 3}), r"bad\.jsonl:1: field 'gold' = 3"),
        (
            json.dumps({"query": 5, "choices": ["a"], "gold": 0}),
            r"bad\.jsonl:1: field 'query' must be a string",
        ),
    ],
)
def test_bad_lines(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    task = TaskConfig(label="bad", dataset_uri=str(tmp_path / "bad.jsonl"), icl_task_type="multiple_choice")
    with pytest.raises(DataError, match=message):
        read_items(task, None)


def test_unknown_task_lists_known_ones():
    with pytest.raises(
        ConfigError, match=r"unknown task 'arc_eazy'; known tasks and suites: .*arc_easy.*copa"
    ):
        resolve_tasks(["arc_eazy"])


def test_task_yaml_rejects_unknown_keys_and_types(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(
        "icl_tasks:\n- {label: x, dataset_uri: a.jsonl, icl_task_type: multiple_choice, num_fewshots: [1]}\n"
    )
    with pytest.raises(
        ConfigError, match=r"unknown key .*icl_tasks\[0\]\.num_fewshots; allowed keys: .*num_fewshot"
    ):
        load_yaml(f)
    f.write_text("icl_tasks:\n- {label: x, dataset_uri: a.jsonl, icl_task_type: rag}\n")
    with pytest.raises(
        ConfigError, match=r"icl_task_type 'rag' is not supported; choose one of: .*code_evaluation"
    ):
        load_yaml(f)


def test_llm_foundry_yaml_reads_unchanged(tmp_path, data_root):
    f = tmp_path / "t.yaml"
    f.write_text(
        "icl_tasks:\n-\n  label: copa\n  dataset_uri: eval/local_data/commonsense_reasoning/copa.jsonl\n"
        "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n- jeopardy_small\n"
    )
    suite = resolve_tasks([str(f)])
    assert [t.label for t in suite.tasks] == ["copa", "jeopardy_small"]
    assert len(read_items(suite.tasks[0], data_root)) == 100


def test_data_root_error_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--data-root"):
        resolve_data_root(None)


class _R:
    def __init__(self, label, k, acc, n=10, categories=None):
        self.label, self.num_fewshot, self.accuracy, self.n, self.categories = (
            label,
            k,
            acc,
            n,
            categories or {},
        )


def test_gauntlet_scores():
    g = {
        "weighting": "EQUAL",
        "averages": {"core": ["c1", "c2"]},
        "categories": [
            {
                "name": "c1",
                "benchmarks": [
                    {"name": "a", "num_fewshot": 0, "random_baseline": 0.25},
                    {"name": "b", "num_fewshot": 3, "random_baseline": 0.0},
                ],
            },
            {
                "name": "c2",
                "benchmarks": [
                    {"name": "c", "num_fewshot": 0, "random_baseline": 0.5},
                    {"name": "gone", "num_fewshot": 0, "random_baseline": 0.5},
                ],
            },
        ],
    }
    out = score_gauntlet(
        g, [_R("a", 0, 0.625), _R("b", 3, 0.5, categories={"x": 0.2, "y": 0.4}), _R("c", 0, 0.25)]
    )
    # a: (0.625 - 0.25) / 0.75 = 0.5; b: mean of its categories 0.3; c: (0.25 - 0.5) / 0.5 = -0.5
    assert out["categories"] == pytest.approx({"c1": 0.4, "c2": -0.5})
    assert out["averages"] == pytest.approx({"core": -0.05})
    assert out["missing"] == ["gone/0-shot"]
    sized = score_gauntlet({**g, "weighting": "SAMPLE_SZ"}, [_R("a", 0, 0.625, n=30), _R("b", 3, 0.3, n=10)])
    assert sized["categories"]["c1"] == pytest.approx((30 * 0.5 + 10 * 0.3) / 40)
