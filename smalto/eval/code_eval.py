"""llm-foundry's code evaluation (`icl_task_type: code_evaluation`, the human_eval family): prompts, sampling,
tests in the sandbox, pass@k.

    context   = prompt_string + shots + [example_delimiter] + question_prelimiter + prompt + continuation_delimiter
                nothing stripped (llm-foundry reads code files with strip_dataset off); a shot adds its
                canonical_solution after its continuation_delimiter; tokens trimmed on the left to max_seq_len
    budget    = min(longest canonical_solution in the file + 10, max_seq_len - longest context in the file) tokens
    samples   = generations_per_sample completions per problem, sampled with temperature 0.2 and transformers'
                defaults top_k 50, top_p 1.0 (generation_kwargs overrides them), up to EOS or the budget
    code      = prompt + completion cut before the first line that starts at column 0
                (re.split(r"\\n[A-Za-z0-9#`]", completion)[0]); run against every test case (code_exec.py)
    pass@k    = mean over problems of 1 - C(n - c, k) / C(n, k): n samples, c of them passing (Chen et al.)
"""

from __future__ import annotations

import math
import re
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from smalto.eval.code_exec import passes
from smalto.eval.prompts import fewshot_indices
from smalto.eval.sandbox import Limits
from smalto.eval.tasks import TaskConfig

_ANSWER_BUFFER = 10  # llm-foundry's _MAX_ANSWER_BUFFER_LENGTH
_FUNCTION_END = re.compile(r"\n[A-Za-z0-9#`]")
SAMPLING_DEFAULTS: dict[str, Any] = {"do_sample": True, "temperature": 0.2, "top_k": 50, "top_p": 1.0}
_STOPS = ["\n" + c for c in string.ascii_letters + string.digits + "#`"]  # the cut of completion_code


@dataclass
class Problem:
    index: int
    task_id: str
    context: list[int]  # tokens the model continues
    prompt: str  # the raw `prompt` the completion is appended to
    entry_point: str
    test_inputs: list[str]
    test_outputs: list[str]
    language: str


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased estimator 1 - C(n-c, k) / C(n, k), in llm-foundry's numerically stable form."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def completion_code(generation: str) -> str:
    """The generated function body: everything before the first line that starts at column 0."""
    return _FUNCTION_END.split(generation)[0]


def context_text(task: TaskConfig, items: list[dict[str, Any]], i: int, shots: list[int]) -> tuple[str, str]:
    """(prompt_string + shots, the item's own context), as llm-foundry builds them (nothing stripped)."""
    preamble = task.prompt_string
    for j in shots:
        ctx = task.question_prelimiter + items[j]["prompt"]
        if preamble:
            ctx = task.example_delimiter + ctx
        preamble += f"{ctx}{task.continuation_delimiter}{items[j]['canonical_solution']}"
    ctx = task.question_prelimiter + items[i]["prompt"]
    if preamble:
        ctx = task.example_delimiter + ctx
    return preamble, ctx + task.continuation_delimiter


def build_problems(
    task: TaskConfig, items: list[dict[str, Any]], k: int, tokenizer: Any, max_seq_len: int, limit: int | None
) -> tuple[list[Problem], int, int]:
    """The first `limit` problems with their context tokens, the generation budget and the longest context in
    tokens (both from the whole file, as llm-foundry)."""
    import random

    rng = random.Random(task.fewshot_random_seed)
    eos = tokenizer.eos_token_id
    problems = []
    longest = 0
    for i, it in enumerate(items):  # every item: the budget depends on the longest context in the file
        shots = fewshot_indices(len(items), k, i, rng) if k > 0 else []
        preamble, ctx = context_text(task, items, i, shots)
        pre = tokenizer(preamble)["input_ids"]
        if eos is not None and len(pre) > 1 and pre[-1] == eos:
            pre = pre[:-1]
        ids = (pre + tokenizer(ctx, add_special_tokens=False)["input_ids"])[-max_seq_len:]
        longest = max(longest, len(ids))
        if limit is None or i < limit:
            problems.append(
                Problem(
                    index=i,
                    task_id=str(it.get("task_id", i)),
                    context=ids,
                    prompt=it["prompt"],
                    entry_point=it["entry_point"],
                    test_inputs=list(it["test_inputs"]),
                    test_outputs=list(it["test_outputs"]),
                    language=it["language"],
                )
            )
    answer = max(
        len(tokenizer(it["canonical_solution"], add_special_tokens=False)["input_ids"]) for it in items
    )
    budget = min(answer + _ANSWER_BUFFER, max_seq_len - longest)
    return problems, int(task.generation_kwargs.get("max_new_tokens", budget)), longest


def sample(
    model: Any, tokenizer: Any, task: TaskConfig, problems: list[Problem], budget: int, seed: int
) -> list[list[str]]:
    """generations_per_sample completions for each problem, the problems sampled as one batch (smalto models;
    transformers models one problem at a time). Generation stops at EOS, the budget, or a line starting at column
    0: what completion_code keeps is decided by then, so stopping there changes nothing."""
    from smalto.eval.scorer import decode_generation, is_smalto

    kw = {**SAMPLING_DEFAULTS, **task.generation_kwargs}
    n = task.generations_per_sample
    greedy = not kw["do_sample"]
    if is_smalto(model):
        from smalto.generate import generate

        out = generate(
            model,
            tokenizer,
            [p.context for p in problems for _ in range(n)],
            max_new_tokens=budget,
            temperature=0.0 if greedy else float(kw["temperature"]),
            top_k=kw["top_k"] or None,
            top_p=kw["top_p"] if kw["top_p"] is not None and kw["top_p"] < 1.0 else None,
            seed=seed,
            stop=_STOPS,
        )
        texts = [decode_generation(tokenizer, c.token_ids) for c in out]
        return [texts[i * n : (i + 1) * n] for i in range(len(problems))]
    result = []
    for p in problems:
        torch.manual_seed(seed + p.index)
        ids = torch.tensor([p.context], device=next(model.parameters()).device)
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=budget,
            do_sample=not greedy,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            **(
                {}
                if greedy
                else {"temperature": kw["temperature"], "top_k": kw["top_k"], "top_p": kw["top_p"]}
            ),
        )
        result.append([decode_generation(tokenizer, row[ids.shape[1] :].tolist()) for row in gen])
    return result


def judge_problems(
    task: TaskConfig, problems: list[Problem], generations: list[list[str]], limits: Limits, workers: int
) -> list[dict[str, Any]]:
    """Run every completion's tests (concurrently: each run is its own sandboxed process) → per-problem records
    with pass@k for every k of the task."""
    jobs = [(pi, completion_code(g)) for pi, gens in enumerate(generations) for g in gens]

    def run(job: tuple[int, str]) -> bool:
        p = problems[job[0]]
        return passes(p.prompt + job[1], p.entry_point, p.test_inputs, p.test_outputs, p.language, limits)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        verdicts = list(pool.map(run, jobs))
    records = []
    n = task.generations_per_sample
    for pi, p in enumerate(problems):
        ok = verdicts[pi * n : (pi + 1) * n]
        rec: dict[str, Any] = {
            "index": p.index,
            "task_id": p.task_id,
            "completions": [c for i, c in jobs if i == pi],
            "passed": ok,
        }
        rec.update({f"pass@{k}": pass_at_k(n, sum(ok), k) for k in task.pass_at_k_list})
        rec["correct"] = rec[f"pass@{task.pass_at_k_list[0]}"]
        records.append(rec)
    return records


def run_code_task(
    model: Any,
    tokenizer: Any,
    task: TaskConfig,
    k: int,
    max_seq_len: int,
    data_root: Any,
    limit: int | None,
    *,
    limits: Limits,
    workers: int,
    batch_size: int = 16,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[dict[str, Any]], str | None]:
    """(records in problem order, None), or ([], why the task cannot run here). Rank r of `world` takes problems
    r, r+W, ... like the other formats; every rank returns all records."""
    from smalto.eval.code_exec import missing_tool
    from smalto.eval.sandbox import warn_about_gaps
    from smalto.eval.tasks import read_items

    warn_about_gaps()
    items = read_items(task, data_root)
    for lang in sorted({it["language"] for it in items}):
        why = missing_tool(lang)
        if why is not None:
            return [], why
    problems, budget, longest = build_problems(task, items, k, tokenizer, max_seq_len, limit)
    if budget < 1:
        return [], (
            f"its longest prompt ({longest} tokens after trimming to the context) leaves no room to generate "
            f"within max_seq_len {max_seq_len} (llm-foundry's budget: min(longest solution + 10, max_seq_len - "
            "longest prompt))"
        )
    mine = problems[rank::world]
    gens: list[list[str]] = []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        gens += sample(model, tokenizer, task, chunk, budget, seed=task.fewshot_random_seed + chunk[0].index)
    records = judge_problems(task, mine, gens, limits, workers)
    for r, p in zip(records, mine, strict=True):
        r["prompt"] = p.prompt
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return records, None
