"""The embedded finetuning default (`smalto finetune` with no arguments, recipe tiny-instruct): the tiny model that
`smalto train` makes, taught to answer instructions built from the Python standard library.

    prepare_instruct(cfg)    writes the instruction set the recipe's first source points at, once: for every
                             function of the stdlib corpus with a docstring and a short body, the instruction is
                             its signature and docstring, the response its source (the `dolly` preprocessing
                             puts them in the MPT-7B-Instruct template)
Nothing is downloaded; the instruction set lands in the finetuning run's folder.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

from rich.console import Console

from smalto.config import RunConfig
from smalto.demo import functions_in

MAX_CHARS = 560  # instruction + response: fits the tiny model's 256 tokens with the template
MAX_EXAMPLES = 1600


def instruction_examples(files: list[Path]) -> list[dict[str, str]]:
    """{instruction, response} for the short documented functions of `files`, in file order."""
    out: list[dict[str, str]] = []
    for node, lines in functions_in(files):
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None:
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        body = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
        args = ast.unparse(node.args)
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        instruction = f"Write a Python function `{node.name}({args}){returns}`.\n{doc}"
        if len(instruction) + len(body) <= MAX_CHARS:
            out.append({"instruction": instruction, "response": body})
    return out


def prepare_instruct(cfg: RunConfig, console: Console | None = None) -> None:
    from smalto.demo import stdlib_files

    out = Path(cfg.data.sources[0].path)
    if out.is_file():
        return
    console = console or Console(stderr=True)
    examples = instruction_examples(stdlib_files())[:MAX_EXAMPLES]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in examples))
    tmp.replace(out)
    console.print(f"instructions: {len(examples)} documented stdlib functions → {out}")
