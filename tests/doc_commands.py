"""The shell commands documented in README.md and docs/*.md, for tests/test_documented_commands.py.

Every line of a ```bash block is a command (a trailing `\\` continues it on the next line; blank and comment-only
lines are skipped). A command that cannot run in CI says so at the end of its trailing comment, which a reader sees
too: `needs: WORD[, WORD]` with WORD one of `NEEDS` (docs/contributing.md). Any other word there is an error, so a
typo cannot skip a command in silence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDS = {
    "gpu": "a GPU (or several: torchrun --nproc_per_node N)",
    "network": "the network (pip, hubs)",
    "data": "a dataset, model or recipe of the reader's at a placeholder path",
    "long": "more than a minute of work (the full demo, a whole suite, the test suite)",
}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"\bneeds:\s*([^#]*?)\s*$")


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository
    line: int
    text: str  # the command, comment removed, continuations joined
    needs: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment): the comment starts at a `#` outside quotes that begins a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def parse_needs(comment: str, where: str) -> tuple[str, ...]:
    m = MARKER.search(comment)
    if not m:
        return ()
    words = tuple(w.strip() for w in m.group(1).split(",") if w.strip())
    unknown = [w for w in words if w not in NEEDS]
    if unknown or not words:
        raise ValueError(f"{where}: `needs: {m.group(1)}`: use one or more of {', '.join(NEEDS)}")
    return words


def commands(path: Path, root: Path = REPO) -> list[DocCommand]:
    text = path.read_text()
    rel = str(path.relative_to(root))
    out = []
    for block in FENCE.finditer(text):
        if block.group(1) not in ("bash", "sh", "shell"):
            continue
        first = text[: block.start(2)].count("\n") + 1
        pending, start = "", 0
        for i, raw in enumerate(block.group(2).splitlines()):
            line = pending + (" " if pending else "") + raw.strip()
            if line.endswith("\\"):
                pending, start = line[:-1].rstrip(), start or first + i
                continue
            lineno, pending, start = start or first + i, "", 0
            command, comment = split_comment(line)
            if command:
                out.append(DocCommand(rel, lineno, command, parse_needs(comment, f"{rel}:{lineno}")))
    return out


def all_commands(root: Path = REPO) -> list[DocCommand]:
    return [c for f in doc_files(root) for c in commands(f, root)]
