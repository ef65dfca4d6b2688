"""Few-shot prompts and their tokens, built exactly as llm-foundry's ICL datasets build them.

For item i with k shots:
    preamble  = prompt_string + shot_1 + shot_2 + ...      shots drawn with one seeded RNG, file order, never i;
                with has_categories only from i's category, each category with its own RNG
    shot      = [example_delimiter] + question_prelimiter + context + continuation_delimiter + answer
                (the delimiter only when something precedes it; schema puts the prelimiter first)
    context   = [example_delimiter] + question_prelimiter + context + continuation_delimiter, right-stripped
    tokens    = tok(preamble) + tok(context) + tok(continuation)   three separate encodings, as llm-foundry
The scored continuation gets a leading space when the tokenizer is GPT-2-style BPE (" a" is one token) and the
text has none. When context + continuation exceed max_seq_len the context loses tokens on the left.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from smalto.errors import DataError
from smalto.eval.tasks import TaskConfig

# generation: room for a chain of thought a little longer than the longest in the file (llm-foundry's margin)
_COT_MARGIN = 10


@dataclass
class Request:
    """One continuation to score: log P(continuation | context)."""

    context: list[int]
    continuation: list[int]


@dataclass
class Item:
    """One task item, ready to run. `requests` holds one entry per choice (one for language modeling, none for
    generation, which uses `gen_context`)."""

    index: int
    prompt: str  # the text before the scored part (for --log-samples)
    requests: list[Request] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # choice texts / context options / the LM continuation
    gold: int = 0
    gen_context: list[int] | None = None
    aliases: list[str] = field(default_factory=list)
    category: str | None = None


def fewshot_indices(n_items: int, k: int, example_idx: int, rng: random.Random) -> list[int]:
    """k distinct indices of other items, drawn as llm-foundry draws them (same RNG calls, same set order)."""
    k = min(n_items - 1, k)
    chosen = set(rng.sample(range(n_items), k))
    if example_idx in chosen:
        chosen.remove(example_idx)
        if len(chosen) < n_items - 1:
            extra = rng.choice(range(n_items))
            while extra in chosen or extra == example_idx:
                extra = rng.choice(range(n_items))
            chosen.add(extra)
    return list(chosen)  # set iteration order, which fixes the order of the shots


def needs_prefix_space(tokenizer: Any) -> bool:
    """GPT-2-style BPE encodes " a" as one token; such tokenizers need the space before a continuation."""
    return len(tokenizer(" a", add_special_tokens=False)["input_ids"]) == 1


def has_cot(items: list[dict[str, Any]]) -> bool:
    return any("chain_of_thought" in it for it in items)


def answer_text(task: TaskConfig, item: dict[str, Any], cot: bool) -> str:
    """What follows a shot's context: the gold continuation, choice, or (chain of thought +) answer."""
    fmt = task.icl_task_type
    if fmt == "language_modeling":
        return item["continuation"]
    if fmt == "multiple_choice":
        return item["choices"][item["gold"]]
    if fmt == "schema":
        return item["continuation"]
    if cot:
        return f"{item.get('chain_of_thought', '')}{task.cot_delimiter}{item['answer']}"
    return item["answer"]


def shot_text(task: TaskConfig, item: dict[str, Any], preceding: str, cot: bool) -> str:
    if task.icl_task_type == "schema":
        ctx = item["context_options"][item["gold"]]
        if preceding:
            ctx = task.example_delimiter + ctx
        return f"{task.question_prelimiter}{ctx}{task.continuation_delimiter}{item['continuation']}"
    ctx = item["query"] if task.icl_task_type == "multiple_choice" else item["context"]
    ctx = task.question_prelimiter + ctx
    if preceding:
        ctx = task.example_delimiter + ctx
    return f"{ctx}{task.continuation_delimiter}{answer_text(task, item, cot)}"


def context_texts(task: TaskConfig, item: dict[str, Any], preamble: str) -> list[str]:
    """The item's own context(s) after the preamble: one, or one per schema context option."""
    if task.icl_task_type == "schema":
        if not preamble:
            return [f"{task.question_prelimiter}{c}" for c in item["context_options"]]
        delim = task.continuation_delimiter.rstrip() if task.strip_dataset else task.continuation_delimiter
        return [
            f"{task.question_prelimiter}{task.example_delimiter}{c}{delim}" for c in item["context_options"]
        ]
    ctx = item["query"] if task.icl_task_type == "multiple_choice" else item["context"]
    ctx = task.question_prelimiter + ctx
    if preamble:
        ctx = task.example_delimiter + ctx
    ctx = ctx + task.continuation_delimiter
    return [ctx.rstrip() if task.strip_dataset else ctx]


def shot_pools(task: TaskConfig, items: list[dict[str, Any]]) -> list[list[int]]:
    """The file's items grouped as llm-foundry builds its datasets: one group, or with `has_categories` one per
    `category` (llm-foundry writes each category to its own file and builds it as a separate dataset)."""
    if not task.has_categories:
        return [list(range(len(items)))]
    pools: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        cat = it.get("category")
        if not isinstance(cat, str):
            raise DataError(
                f"{task.path(None).name}:{i + 1} (task {task.label}): has_categories is set but the item has no "
                "string field 'category'"
            )
        pools.setdefault(cat, []).append(i)
    return [pools[c] for c in sorted(pools)]


def build_prompts(
    task: TaskConfig, items: list[dict[str, Any]], k: int, limit: int | None = None
) -> list[tuple[str, list[str]]]:
    """(preamble, contexts) for the first `limit` items, in file order. Shots come from the item's pool (the
    file, or its category), each pool with its own RNG seeded with fewshot_random_seed and drawn in file order,
    so a prefix of the file gets the prompts the whole file gives it."""
    cot = has_cot(items)
    n = len(items) if limit is None else min(limit, len(items))
    prompts: dict[int, tuple[str, list[str]]] = {}
    for pool in shot_pools(task, items):
        rng = random.Random(task.fewshot_random_seed)
        for pos, i in enumerate(pool):
            if i >= n:
                break
            preamble = task.prompt_string
            if k > 0:
                for j in fewshot_indices(len(pool), k, pos, rng):
                    preamble += shot_text(task, items[pool[j]], preamble, cot)
            prompts[i] = (preamble, context_texts(task, items[i], preamble))
    return [prompts[i] for i in range(n)]


def _with_space(text: str, prefix_space: bool) -> str:
    return f" {text}" if prefix_space and not text.startswith(" ") else text


def _trim(context: list[int], n_cont: int, max_seq_len: int, where: str) -> list[int]:
    room = max_seq_len - n_cont
    if room < 0:
        raise DataError(
            f"{where}: the continuation alone ({n_cont} tokens) is longer than max_seq_len ({max_seq_len})"
        )
    return (
        context[-room:] if len(context) > room else context
    )  # keep the right end: it sits next to the answer


def max_answer_tokens(task: TaskConfig, items: list[dict[str, Any]], tokenizer: Any) -> int:
    """Generation budget: the longest (chain of thought +) answer or alias in the file, in tokens (special
    tokens included). Pass the items as read, unstripped: llm-foundry measures them before strip_dataset."""
    cot = has_cot(items)
    texts = []
    for it in items:
        for ans in [it["answer"], *it.get("aliases", [])]:
            texts.append(f"{it.get('chain_of_thought', '')}{task.cot_delimiter}{ans}" if cot else ans)
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
    return longest + (_COT_MARGIN if task.cot_delimiter else 0)


def build_items(
    task: TaskConfig,
    items: list[dict[str, Any]],
    k: int,
    tokenizer: Any,
    max_seq_len: int,
    limit: int | None = None,
    answer_budget: int | None = None,
) -> list[Item]:
    """Prompts → token requests for the first `limit` items. Generation contexts keep room for `answer_budget`
    new tokens (default: max_answer_tokens of `items`; pass it from the unstripped items to match llm-foundry)."""
    prompts = build_prompts(task, items, k, limit)
    prefix_space = needs_prefix_space(tokenizer)
    eos = tokenizer.eos_token_id
    pre_ids = tokenizer([p for p, _ in prompts])["input_ids"] if prompts else []
    fmt = task.icl_task_type
    if fmt == "generation_task_with_answers" and answer_budget is None:
        answer_budget = max_answer_tokens(task, items, tokenizer)
    gen_room = max_seq_len - answer_budget if answer_budget is not None else 0
    out = []
    for i, ((preamble, contexts), pre) in enumerate(zip(prompts, pre_ids, strict=True)):
        if (
            eos is not None and len(pre) > 1 and pre[-1] == eos
        ):  # a tokenizer that appends EOS: not mid-prompt
            pre = pre[:-1]
        raw = items[i]
        where = f"{task.path(None).name}:{i + 1} (task {task.label})"
        ctx_ids = [pre + c for c in tokenizer(contexts, add_special_tokens=False)["input_ids"]]
        item = Item(
            index=i,
            prompt=preamble + contexts[0],
            category=raw.get("category") if task.has_categories else None,
        )
        if fmt == "generation_task_with_answers":
            item.gen_context = ctx_ids[0][-gen_room:] if gen_room > 0 else ctx_ids[0][-1:]
            item.aliases = sorted({raw["answer"], *raw.get("aliases", [])})
            item.options = [answer_text(task, raw, has_cot([raw]))]
        elif fmt == "multiple_choice":
            item.options = list(raw["choices"])
            conts = tokenizer(
                [_with_space(c, prefix_space) for c in raw["choices"]], add_special_tokens=False
            )["input_ids"]
            item.requests = [Request(_trim(ctx_ids[0], len(c), max_seq_len, where), c) for c in conts]
            item.gold = raw["gold"]
        elif fmt == "schema":
            item.options = list(contexts)
            cont = tokenizer(_with_space(raw["continuation"], prefix_space), add_special_tokens=False)[
                "input_ids"
            ]
            item.requests = [Request(_trim(c, len(cont), max_seq_len, where), cont) for c in ctx_ids]
            item.gold = raw["gold"]
            item.prompt = preamble
        else:
            cont = tokenizer(_with_space(raw["continuation"], prefix_space), add_special_tokens=False)[
                "input_ids"
            ]
            item.options = [raw["continuation"]]
            item.requests = [Request(_trim(ctx_ids[0], len(cont), max_seq_len, where), cont)]
        for r in item.requests:
            if not r.continuation:
                raise DataError(f"{where}: empty continuation: nothing to score")
        out.append(item)
    return out
