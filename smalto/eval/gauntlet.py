"""llm-foundry's eval gauntlet: tasks grouped into categories, each scored above its random-guess baseline.

    eval_gauntlet:
      weighting: EQUAL              # EQUAL | SAMPLE_SZ | LOG_SAMPLE_SZ: a benchmark's weight in its category
      subtract_random_baseline: true
      rescale_accuracy: true        # with the above: score = (accuracy - baseline) / (1 - baseline)
      averages: {core_average: [world_knowledge, ...]}   # means of category scores
      categories:
      - name: world_knowledge
        benchmarks:
        - {name: arc_easy, num_fewshot: 3, random_baseline: 0.25}

A task with `has_categories` (jeopardy) enters as the mean of its per-category accuracies, as llm-foundry's
callback averages its sub-results. Benchmarks not evaluated in this run are skipped and listed under `missing`;
a category with none evaluated is left out of the averages.
"""

from __future__ import annotations

import math
from typing import Any

from smalto.errors import ConfigError, check_choice, check_keys

_KEYS = ("averages", "categories", "rescale_accuracy", "subtract_random_baseline", "weighting")
_WEIGHTINGS = ("EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ")


def _check(g: dict[str, Any]) -> None:
    check_keys("eval_gauntlet", g, _KEYS)
    check_choice("eval_gauntlet.weighting", g.get("weighting", "EQUAL"), _WEIGHTINGS)
    for c in g.get("categories", []):
        for b in c.get("benchmarks", []):
            for key in ("name", "num_fewshot", "random_baseline"):
                if key not in b:
                    raise ConfigError(f"eval_gauntlet category {c.get('name')!r}: a benchmark lacks {key!r}")
            if not 0 <= b["random_baseline"] < 1:
                raise ConfigError(f"eval_gauntlet benchmark {b['name']!r}: random_baseline must be in [0, 1)")


def benchmark_score(accuracy: float, baseline: float, subtract: bool = True, rescale: bool = True) -> float:
    score = accuracy - baseline if subtract else accuracy
    return score / (1.0 - baseline) if subtract and rescale else score


def score_gauntlet(g: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """Category and average scores from TaskResults (anything with label, num_fewshot, accuracy, n, categories)."""
    _check(g)
    by_key = {(r.label, r.num_fewshot): r for r in results}
    weighting = g.get("weighting", "EQUAL")
    subtract, rescale = g.get("subtract_random_baseline", True), g.get("rescale_accuracy", True)
    categories: dict[str, float] = {}
    benchmarks: dict[str, float] = {}
    missing: list[str] = []
    for cat in g.get("categories", []):
        total, weights = 0.0, 0.0
        for b in cat["benchmarks"]:
            r = by_key.get((b["name"], b["num_fewshot"]))
            if r is None:
                missing.append(f"{b['name']}/{b['num_fewshot']}-shot")
                continue
            acc = sum(r.categories.values()) / len(r.categories) if r.categories else r.accuracy
            s = benchmark_score(acc, b["random_baseline"], subtract, rescale)
            benchmarks[f"{cat['name']}/{b['name']}"] = s
            w = {"EQUAL": 1.0, "SAMPLE_SZ": float(r.n), "LOG_SAMPLE_SZ": math.log(max(r.n, 2))}[weighting]
            total, weights = total + w * s, weights + w
        if weights > 0:
            categories[cat["name"]] = total / weights
    averages: dict[str, float] = {}
    for name, cats in (g.get("averages") or {}).items():
        present = [categories[c] for c in cats if c in categories]
        if present:
            averages[name] = sum(present) / len(present)
    return {"categories": categories, "averages": averages, "benchmarks": benchmarks, "missing": missing}
