"""ICL task configs, the task files smalto ships, and reading llm-foundry's jsonl task files.

A task YAML holds `icl_tasks:` (a list of task configs, llm-foundry's keys) and optionally `eval_gauntlet:`
(see `gauntlet.py`). `dataset_uri` is a path relative to the data root (`--data-root`), so the same YAML works
wherever the data lives; llm-foundry's `eval/local_data/` prefix is accepted and dropped.

Formats (llm-foundry's), with the fields every line must have:
    language_modeling             context, continuation
    multiple_choice               query, choices, gold
    schema                        context_options, continuation, gold
    generation_task_with_answers  context, answer (+ optional aliases, chain_of_thought)
    code_evaluation               prompt, canonical_solution, entry_point, test_inputs, test_outputs, language
                                  (+ task_id); run in a sandbox, scored pass@k (code_eval.py)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from smalto.errors import ConfigError, DataError, check_keys

FORMATS: dict[str, tuple[str, ...]] = {
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer"),
    "code_evaluation": (
        "prompt",
        "canonical_solution",
        "entry_point",
        "test_inputs",
        "test_outputs",
        "language",
    ),
}
# generation_kwargs a code task may set (llm-foundry passes them to transformers' generate)
_GENERATION_KWARGS = (
    "do_sample",
    "max_new_tokens",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "use_cache",
)
_LEGACY_PREFIX = "eval/local_data/"
DEFAULT_DATA_ROOT = "../shared/icl_data"


@dataclass(kw_only=True)
class TaskConfig:
    """One ICL task; field names and defaults are llm-foundry's, so its task YAMLs read unchanged."""

    label: str
    dataset_uri: str
    icl_task_type: str
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    prompt_string: str = ""  # once, before the few-shot examples
    example_delimiter: str = "\n"  # between examples
    continuation_delimiter: str = " "  # between an example's context and its answer
    question_prelimiter: str = ""  # before every context
    fewshot_random_seed: int = 1234
    max_seq_len: int | None = None  # default: the model's
    cot_delimiter: str = ""  # generation: the answer follows the last occurrence of this
    early_stopping_criteria: list[str] = field(default_factory=list)  # generation stop strings
    do_normalization: bool = True  # generation: compare normalized strings
    has_categories: bool = False  # report accuracy per item `category` too
    strip_dataset: bool = True  # strip whitespace around every string field, as llm-foundry does
    batch_size: int | None = None  # llm-foundry key; when set, overrides --batch-size for this task
    # llm-foundry spells some metrics' options as post-processing functions; qa_normalization is our default
    post_processing_funcs: list[Any] = field(default_factory=list)
    # code_evaluation: samples per problem, the k of pass@k (one or several), sampling settings
    generations_per_sample: int = 1
    pass_at_k: int | list[int] = 1
    generation_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"task {self.label!r}"
        if self.icl_task_type not in FORMATS:
            raise ConfigError(
                f"{where}: icl_task_type {self.icl_task_type!r} is not supported; choose one of: {', '.join(FORMATS)}"
            )
        self._check_code(where)
        if isinstance(self.num_fewshot, int):
            self.num_fewshot = [self.num_fewshot]
        if not self.num_fewshot or any(not isinstance(n, int) or n < 0 for n in self.num_fewshot):
            raise ConfigError(
                f"{where}: num_fewshot must be a non-negative int or a list of them, got {self.num_fewshot!r}"
            )
        if isinstance(self.early_stopping_criteria, str):
            self.early_stopping_criteria = [self.early_stopping_criteria]
        for f in self.post_processing_funcs:
            name = f.get("name") if isinstance(f, dict) else f
            if name != "qa_normalization":
                raise ConfigError(
                    f"{where}: post_processing_funcs {name!r} is not supported (only qa_normalization)"
                )

    @property
    def pass_at_k_list(self) -> list[int]:
        return [self.pass_at_k] if isinstance(self.pass_at_k, int) else list(self.pass_at_k)

    def _check_code(self, where: str) -> None:
        ks = self.pass_at_k_list
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise ConfigError(
                f"{where}: pass_at_k must be a whole number >= 1 or a list of them, got {self.pass_at_k!r}"
            )
        if not isinstance(self.generations_per_sample, int) or self.generations_per_sample < 1:
            raise ConfigError(f"{where}: generations_per_sample must be a whole number >= 1")
        if self.generations_per_sample < max(ks):  # llm-foundry's check and wording
            raise ConfigError(
                f"{where}: generations_per_sample ({self.generations_per_sample}) must be greater than or equal to "
                f"pass_at_k ({self.pass_at_k}) for code evaluation."
            )
        check_keys(f"{where} generation_kwargs", self.generation_kwargs, _GENERATION_KWARGS)
        if self.generation_kwargs.get("num_beams", 1) != 1:
            raise ConfigError(f"{where}: generation_kwargs.num_beams: only 1 (sampling) is supported")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "task") -> TaskConfig:
        d = dict(d)
        if "num_beams" in d:  # llm-foundry refuses it too
            raise ConfigError(
                f"{where}: num_beams is no longer supported as a top level icl_task parameter; "
                "use generation_kwargs (sampling: generations_per_sample, temperature, top_k, top_p)"
            )
        if "prelimiter" in d:  # the dataset classes' name for question_prelimiter
            d.setdefault("question_prelimiter", d.pop("prelimiter"))
        check_keys(where, d, sorted(f.name for f in dataclasses.fields(cls)))
        for key in ("label", "dataset_uri", "icl_task_type"):
            if key not in d:
                raise ConfigError(f"{where} lacks the required key {key!r}")
        return cls(**d)

    def path(self, data_root: str | Path | None) -> Path:
        """The jsonl file: `dataset_uri` as given when absolute or present, else under the data root."""
        uri = self.dataset_uri
        if Path(uri).is_absolute() or data_root is None:
            return Path(uri)
        root = Path(data_root)
        p = root / uri
        if not p.exists() and uri.startswith(_LEGACY_PREFIX):
            p = root / uri[len(_LEGACY_PREFIX) :]
        return p


@dataclass
class Suite:
    """Tasks to run, and the gauntlet (a dict as in the YAML) that scores them, if any."""

    tasks: list[TaskConfig]
    gauntlet: dict[str, Any] | None = None


# ---------------------------------------------------------------- shipped task files and names


def _shipped(name: str) -> dict[str, Any]:
    text = resources.files("smalto.eval").joinpath("tasks", name).read_text()
    return yaml.safe_load(text)


def shipped_suites() -> dict[str, str]:
    """Suite names usable on the command line → shipped YAML file."""
    return {"gauntlet": "gauntlet_v0.3.yaml", "gauntlet_v0.3": "gauntlet_v0.3.yaml", "all": "tasks.yaml"}


def shipped_tasks() -> dict[str, TaskConfig]:
    """Every task smalto ships a config for, by label."""
    doc = _shipped("tasks.yaml")
    return {t["label"]: TaskConfig.from_dict(t, "tasks.yaml") for t in doc["icl_tasks"]}


def load_yaml(path: str | Path) -> Suite:
    """A task YAML: `icl_tasks:` and optionally `eval_gauntlet:`; tasks may be dicts or names of shipped tasks."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read task file {p}: {e}") from None
    return _suite_from_doc(doc, str(p))


def _suite_from_doc(doc: Any, where: str) -> Suite:
    if not isinstance(doc, dict) or "icl_tasks" not in doc:
        raise ConfigError(f"{where} has no `icl_tasks:` list")
    check_keys("", doc, ("eval_gauntlet", "icl_tasks"))
    known: dict[str, TaskConfig] | None = None
    tasks = []
    for i, t in enumerate(doc["icl_tasks"]):
        if isinstance(t, str):
            known = known if known is not None else shipped_tasks()
            tasks.append(_by_name(t, known))
        else:
            tasks.append(TaskConfig.from_dict(t, f"{where} icl_tasks[{i}]"))
    return Suite(tasks=tasks, gauntlet=doc.get("eval_gauntlet"))


def _by_name(name: str, known: dict[str, TaskConfig]) -> TaskConfig:
    if name not in known:
        names = ", ".join([*shipped_suites(), *sorted(known)])
        raise ConfigError(
            f"unknown task {name!r}; known tasks and suites: {names} (or pass a task YAML path)"
        )
    return known[name]


def resolve_tasks(specs: list[str] | str) -> Suite:
    """`--tasks` values → a Suite. Each spec is a YAML path, a suite name (gauntlet, all) or a task label;
    comma-separated lists are split. A single suite keeps its gauntlet."""
    if isinstance(specs, str):
        specs = [specs]
    items = [s.strip() for spec in specs for s in spec.split(",") if s.strip()]
    if not items:
        raise ConfigError(
            "no tasks given: pass --tasks with a task YAML, a suite name (gauntlet, all) or task labels"
        )
    suites = shipped_suites()
    known: dict[str, TaskConfig] | None = None
    tasks: list[TaskConfig] = []
    gauntlet = None
    for s in items:
        if s.endswith((".yaml", ".yml")) or Path(s).is_file():
            sub = load_yaml(s)
        elif s in suites:
            sub = _suite_from_doc(_shipped(suites[s]), suites[s])
        else:
            known = known if known is not None else shipped_tasks()
            sub = Suite(tasks=[_by_name(s, known)])
        tasks.extend(t for t in sub.tasks if t.label not in {x.label for x in tasks})
        gauntlet = gauntlet or sub.gauntlet
    return Suite(tasks=tasks, gauntlet=gauntlet)


def resolve_data_root(data_root: str | Path | None) -> Path:
    """`--data-root`, or `../shared/icl_data` when it exists relative to the working directory."""
    if data_root is not None:
        p = Path(data_root)
        if not p.is_dir():
            raise ConfigError(f"--data-root {p} is not a folder")
        return p
    p = Path(DEFAULT_DATA_ROOT)
    if p.is_dir():
        return p
    raise ConfigError(
        f"no ICL data folder: {DEFAULT_DATA_ROOT} does not exist here; pass --data-root DIR "
        "(a folder with llm-foundry's local_data layout, e.g. world_knowledge/arc_easy.jsonl)"
    )


# ---------------------------------------------------------------- jsonl


def read_items(
    task: TaskConfig, data_root: str | Path | None, *, strip: bool | None = None
) -> list[dict[str, Any]]:
    """The task's items, checked for the fields its format needs; errors name the file, line and field.
    String fields are stripped when `strip` (default: the task's strip_dataset; never for code, as llm-foundry)."""
    strip = task.strip_dataset if strip is None else strip
    strip = strip and task.icl_task_type != "code_evaluation"
    path = task.path(data_root)
    if not path.is_file():
        raise DataError(
            f"task {task.label!r}: dataset {path} not found (dataset_uri {task.dataset_uri!r}; see --data-root)"
        )
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
            _check_item(item, task.icl_task_type, where)
            if strip:
                item = strip_item(item)
            items.append(item)
    if not items:
        raise DataError(f"{path} holds no items")
    return items


def strip_item(item: dict[str, Any]) -> dict[str, Any]:
    """llm-foundry's strip_data: whitespace stripped around every top-level string field."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in item.items()}


def _check_item(item: dict[str, Any], fmt: str, where: str) -> None:
    for key in FORMATS[fmt]:
        if key not in item:
            raise DataError(f"{where}: missing field {key!r} (a {fmt} item needs {', '.join(FORMATS[fmt])})")
    options = {"multiple_choice": "choices", "schema": "context_options"}.get(fmt)
    if options is not None:
        opts = item[options]
        if not isinstance(opts, list) or not opts or not all(isinstance(o, str) for o in opts):
            raise DataError(f"{where}: field {options!r} must be a non-empty list of strings")
        gold = item["gold"]
        if not isinstance(gold, int) or not 0 <= gold < len(opts):
            raise DataError(
                f"{where}: field 'gold' = {gold!r} is not an index into {options!r} ({len(opts)} entries)"
            )
    if fmt == "code_evaluation":
        for key in ("test_inputs", "test_outputs"):
            if not isinstance(item[key], list) or not all(isinstance(x, str) for x in item[key]):
                raise DataError(f"{where}: field {key!r} must be a list of strings")
        if len(item["test_inputs"]) != len(item["test_outputs"]):
            raise DataError(f"{where}: test_inputs and test_outputs differ in length")
    lists = ("choices", "context_options", "gold", "test_inputs", "test_outputs")
    text_fields = [k for k in FORMATS[fmt] if k not in lists]
    for key in text_fields:
        if not isinstance(item[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(item[key]).__name__}")
    if fmt == "generation_task_with_answers":
        aliases = item.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise DataError(f"{where}: field 'aliases' must be a list of strings")
