"""The embedded DPO default (`smalto dpo` with no arguments, recipe tiny-dpo): the tiny model that `smalto train`
makes, taught by preference pairs built from the Python standard library to document its functions.

    prepare_preferences(cfg)  writes the pairs the recipe's source and eval source point at, once: for every short
                              stdlib function with a docstring, the prompt is its `def` line(s), the chosen
                              completion its body with the docstring, the rejected one the same body without it
    measure(cfg, model)       the property's rate: the share of held-out prompts whose greedy continuation opens
                              with a docstring (the first tokens after the `def` line are a string literal)
Nothing is downloaded and nobody judges: the property is checked by a string test on the model's own output.
"""

from __future__ import annotations

import ast
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from smalto.demo import functions_in

MAX_CHARS = 360  # prompt + chosen: fits the recipe's max_length of 128 tokens of the tiny tokenizer
EVAL_EVERY = 20  # every 20th pair is held out (its prompt is a held-out prompt of the demo's measure)
SAMPLE_TOKENS = 4


def preference_pairs(files: list[Path]) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} for the short documented functions of `files`, in file order."""
    out: list[dict[str, str]] = []
    for node, lines in functions_in(files):
        if node.end_lineno is None:
            continue
        doc, rest = node.body[0], node.body[1:]
        if ast.get_docstring(node) is None or not rest or doc.end_lineno is None:
            continue
        if node.decorator_list or doc.lineno == node.lineno:  # the def line(s) alone make the prompt
            continue
        text = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno])).splitlines(keepends=True)
        head = doc.lineno - node.lineno  # lines of the signature
        doc_end = doc.end_lineno - node.lineno + 1
        # the prompt ends at the colon: a newline alone is a token the model never saw before an indent
        prompt = "".join(text[:head]).rstrip("\n")
        docstring, body = "".join(text[head:doc_end]), "".join(text[doc_end:])
        if len(prompt) + len(docstring) + len(body) <= MAX_CHARS and body.strip():
            out.append({"prompt": prompt, "chosen": "\n" + docstring + body, "rejected": "\n" + body})
    return out


def prepare_preferences(cfg: Any, console: Console | None = None) -> None:
    """The training pairs (data.sources[0]) and held-out pairs (data.eval_sources[0]) of the tiny-dpo recipe."""
    from smalto.demo import stdlib_files

    train_file, eval_file = Path(cfg.data.sources[0].path), Path(cfg.data.eval_sources[0].path)
    if train_file.is_file() and eval_file.is_file():
        return
    console = console or Console(stderr=True)
    pairs = preference_pairs(stdlib_files())
    held = pairs[::EVAL_EVERY]
    kept = [p for i, p in enumerate(pairs) if i % EVAL_EVERY]
    for path, part in ((train_file, kept), (eval_file, held)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in part))
        tmp.replace(path)
    console.print(
        f"preferences: {len(kept)} training and {len(held)} held-out pairs (documented stdlib functions)"
    )


def opens_with_docstring(continuation: str) -> bool:
    """The property the chosen completions have: the body opens with a string literal."""
    text = continuation.lstrip()
    return text.lstrip("rRbBuU").startswith(('"""', "'''", '"', "'"))


@dataclass
class DemoReport:
    prompts: int
    rate_before: float
    rate_after: float | None = None
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, before, after)
    before_texts: list[str] = field(default_factory=list)


def held_out_prompts(cfg: Any) -> list[str]:
    path = Path(cfg.data.eval_sources[0].path)
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def measure(cfg: Any, model_path: str, before: DemoReport | None = None) -> DemoReport:
    """The share of held-out prompts whose greedy continuation opens with a docstring, for the model at
    `model_path`; with `before`, the report gains the rate after."""
    from smalto.generate import generate
    from smalto.load import load_model_and_tokenizer

    prepare_preferences(cfg)
    prompts = held_out_prompts(cfg)
    model, tok = load_model_and_tokenizer(model_path, device="cpu" if cfg.train.device == "cpu" else None)
    outs = [
        o.text or "" for o in generate(model, tok, prompts, max_new_tokens=SAMPLE_TOKENS, temperature=0.0)
    ]
    rate = sum(map(opens_with_docstring, outs)) / len(prompts)
    if before is None:
        return DemoReport(prompts=len(prompts), rate_before=rate, before_texts=outs)
    examples = list(zip(prompts, before.before_texts, outs, strict=True))[:3]
    return DemoReport(
        prompts=len(prompts), rate_before=before.rate_before, rate_after=rate, examples=examples
    )


def show_report(r: DemoReport, console: Any) -> None:
    after = "-" if r.rate_after is None else f"{100 * r.rate_after:.0f}%"
    console.print(
        f"held-out prompts whose continuation opens with a docstring ({r.prompts} prompts): "
        f"{100 * r.rate_before:.0f}% before → {after} after",
        highlight=False,
    )
    for prompt, was, now in r.examples:
        console.rule("held-out prompt")
        console.print(f"{prompt}\nbefore: {was!r}\nafter:  {now!r}", markup=False, highlight=False)
