"""The data of the embedded reward and PPO demos, built from the Python standard library (nothing is downloaded).

The reward demo favours a property a program checks: **the function returns a value** (`return <expr>`).
    function_parts(files)      (head, body) of every short documented function: the head is its `def` line(s)
                               and docstring, the body the rest of its source, both dedented
    prepare_pairs(path)        TRL preference rows: prompt = head, chosen = a body with `return <expr>`,
                               rejected = the same body with each `return ` dropped (`return x` → `x`: still Python,
                               one keyword apart), so only the property tells them apart
    prepare_prompts(path)      {"prompt": head} rows: what the policy continues during PPO
The PPO demo rewards, by rule (smalto/train/scorers.py), completions of the heads with an assignment (`contains: =`,
written by the tiny model in about 40% of completions); `contains:return` (about 6%) is the reward demo's property.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path

from rich.console import Console

from smalto.demo import functions_in

MAX_CHARS = 600  # head + body: fits the tiny model's 256 tokens
RETURN = re.compile(r"^(\s*)return (?=\S)", re.MULTILINE)


def function_parts(files: list[Path]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for node, lines in functions_in(files):
        if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None:
            continue
        if len(node.body) < 2 or node.end_lineno is None:
            continue
        doc = node.body[0]
        assert doc.end_lineno is not None
        text = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno])) + "\n"
        cut = doc.end_lineno - node.lineno + 1  # lines of the head: def line(s) and the docstring
        parts = text.splitlines(keepends=True)
        head, body = "".join(parts[:cut]), "".join(parts[cut:])
        if body.strip() and len(head) + len(body) <= MAX_CHARS:
            out.append((head, body))
    return out


def preference_rows(parts: list[tuple[str, str]]) -> list[dict[str, str]]:
    rows = []
    for head, body in parts:
        dropped = RETURN.sub(r"\1", body)
        if dropped != body:
            rows.append({"prompt": head, "chosen": body, "rejected": dropped})
    return rows


def prepare_pairs(path: str, console: Console | None = None) -> None:
    _write_once(
        path, lambda parts: preference_rows(parts), "preference pairs (return a value: chosen)", console
    )


def prepare_prompts(path: str, console: Console | None = None) -> None:
    _write_once(path, lambda parts: [{"prompt": h} for h, _ in parts], "prompts (function heads)", console)


def _write_once(path: str, make, what: str, console: Console | None) -> None:  # type: ignore[no-untyped-def]
    from smalto.demo import stdlib_files

    out = Path(path)
    if out.is_file():
        return
    rows = make(function_parts(stdlib_files()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    (console or Console(stderr=True)).print(f"{what}: {len(rows)} from the standard library → {out}")
