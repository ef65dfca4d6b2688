"""Evaluation: llm-foundry's ICL task formats and gauntlet, perplexity on token shards, an lm-eval adapter.

    from smalto.eval import evaluate, evaluate_icl
    results = evaluate(model, tokenizer, ["gauntlet"], data_root="../shared/icl_data")   # EvalResults
    metrics = evaluate_icl(model, tokenizer, ["arc_easy", "copa"], limit=200)            # {"icl/arc_easy/3-shot": ...}

Import-light: torch and transformers load only when a function runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "evaluate_icl", "perplexity", "resolve_tasks"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "evaluate_icl"):
        from smalto.eval import runner

        return getattr(runner, name)
    if name == "perplexity":
        from smalto.eval.perplexity import perplexity

        return perplexity
    if name == "resolve_tasks":
        from smalto.eval.tasks import resolve_tasks

        return resolve_tasks
    raise AttributeError(name)
