"""Per-item verdicts for the four formats, from the model's scores or generations.

language_modeling             correct when greedy decoding reproduces every continuation token
multiple_choice / schema      the option with the lowest mean per-token cross-entropy wins (ties: the first)
generation_task_with_answers  cut at the first stop string, keep what follows the last CoT delimiter,
                              normalize (or with do_normalization: false only strip whitespace, both sides),
                              correct when it starts with any alias treated the same way
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from smalto.eval.prompts import Item
from smalto.eval.tasks import TaskConfig

_PUNCT = set(string.punctuation) | {"‘", "’", "´", "`"}


@dataclass
class Score:
    """What the model said about one request: sum of continuation log-probs, their count, greedy match."""

    logprob: float
    n_tokens: int
    greedy: bool

    @property
    def mean_ce(self) -> float:
        return -self.logprob / self.n_tokens


def normalize_answer(text: str) -> str:
    """TriviaQA's normalization: underscores and punctuation become spaces, lower case, no articles, single spaces."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


def extract_answer(output: str, stop: list[str], cot_delimiter: str) -> str:
    """The answer part of a generation: before the first stop string, after the last CoT delimiter."""
    if stop:
        output = re.split("|".join(re.escape(s) for s in stop), output)[0]
    if cot_delimiter:
        output = output.split(cot_delimiter)[-1]
    return output


def generation_correct(output: str, aliases: list[str], task: TaskConfig) -> tuple[bool, str]:
    answer = extract_answer(output, task.early_stopping_criteria, task.cot_delimiter)
    if task.do_normalization:
        answer = normalize_answer(answer)
        aliases = [normalize_answer(a) for a in aliases]
    else:  # llm-foundry still strips both: " 18" answers "18"
        answer = answer.strip()
        aliases = [a.strip() for a in aliases]
    return any(answer.startswith(a) for a in aliases), answer


def judge(task: TaskConfig, item: Item, scores: list[Score] | None, output: str | None) -> dict[str, Any]:
    """One item's record: correct, prediction, and the scores behind it (what --log-samples writes)."""
    fmt = task.icl_task_type
    rec: dict[str, Any] = {"index": item.index}
    if item.category is not None:
        rec["category"] = item.category
    if fmt == "generation_task_with_answers":
        assert output is not None
        ok, answer = generation_correct(output, item.aliases, task)
        rec.update(correct=ok, output=output, prediction=answer, aliases=item.aliases)
        return rec
    assert scores is not None
    if fmt == "language_modeling":
        s = scores[0]
        rec.update(correct=s.greedy, mean_ce=s.mean_ce, logprob=s.logprob, target=item.options[0])
        return rec
    ces = [s.mean_ce for s in scores]
    pred = ces.index(min(ces))
    rec.update(
        correct=pred == item.gold,
        prediction=pred,
        gold=item.gold,
        mean_ce=ces,
        logprob=[s.logprob for s in scores],
    )
    return rec
