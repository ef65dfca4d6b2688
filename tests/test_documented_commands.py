"""Every command in README.md and docs/*.md ```bash blocks runs as written (tests/doc_commands.py extracts them),
so a documented command cannot silently break. Commands marked `needs: gpu|network|data|long` are skipped with that
reason (docs/contributing.md); every other one must exit 0 in a sandbox folder that holds stand-ins for the paths
the docs use as examples:

    runs/tiny             a short run of the demo recipe (`smalto train train.max_duration=8ba ...`)
    ./mpt-1b              that run's HF export (a tiny MPT standing in for a published one)
    path/to/tokenizer     the demo's tokenizer
    data/c4               the demo's token shards (train/ and val/)
    corpus/, pile.jsonl, code.jsonl, crawl/*.parquet, docs.txt.gz   small inputs for `smalto data`
    ../shared             the repository's ../shared (ICL task files, tokenizers)

`smalto`, `python` and `python3` on the PATH run this checkout's smalto with this interpreter.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_commands import NEEDS, REPO, DocCommand, all_commands, commands, parse_needs

COMMANDS = all_commands()
TIMEOUT = 240  # seconds per command; the suite's unmarked commands take about a minute together


def test_commands_are_found_and_markers_read(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(
        "text\n```bash\n# a comment line\nsmalto eval m \\\n  --tasks a  # the tasks; needs: gpu, long\n\n"
        "echo '# not a comment'  # fine\n```\n```python\nprint('not shell')\n```\n"
    )
    got = commands(doc, tmp_path)
    assert got == [
        DocCommand("docs/x.md", 4, "smalto eval m --tasks a", ("gpu", "long")),
        DocCommand("docs/x.md", 7, "echo '# not a comment'", ()),
    ]
    with pytest.raises(ValueError, match=r"x\.md:9: `needs: gpus`"):
        parse_needs("needs: gpus", "x.md:9")
    assert len(COMMANDS) >= 20 and any("smalto data" in c.text and not c.needs for c in COMMANDS)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    box = root / "repo"
    box.mkdir()
    (root / "shared").symlink_to((REPO.parent / "shared").resolve())
    for part in ("bench", "configs", "docs"):  # documented commands run from a clone's root and read these
        (box / part).symlink_to(REPO / part)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, target in (("python", ""), ("python3", ""), ("smalto", " -m smalto")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable}{target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = _env(root)
    demo = [
        "train.max_duration=8ba",
        "train.eval_interval=8ba",
        "checkpoint.interval=8ba",
        "train.sample_tokens=8",
    ]
    p = subprocess.run(
        ["smalto", "train", *demo], cwd=box, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (box / "mpt-1b").symlink_to(box / "runs" / "tiny" / "hf")
    (box / "path" / "to").mkdir(parents=True)
    shutil.copytree(box / "runs" / "tiny" / "tokenizer", box / "path" / "to" / "tokenizer")
    (box / "data").mkdir()
    shutil.copytree(box / "runs" / "tiny" / "data", box / "data" / "c4")
    _inputs(box)
    return box


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _inputs(box: Path) -> None:
    """Small inputs for docs/data.md, from the standard library's sources (enough tokens for --seq-len 2048)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smalto.demo import stdlib_files

    texts = [p.read_text(errors="replace") for p in stdlib_files(600_000)]
    half = len(texts) // 2
    (box / "corpus").mkdir()
    for i, t in enumerate(texts):
        (box / "corpus" / f"{i:03d}.txt").write_text(t)
    (box / "pile.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    (box / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:half]))
    (box / "crawl").mkdir()
    pq.write_table(pa.table({"text": texts[half:]}), box / "crawl" / "part-0.parquet")
    with gzip.open(box / "docs.txt.gz", "wt") as f:
        f.write("".join(line + "\n" for t in texts for line in t.splitlines() if line.strip()))


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs(command: DocCommand, sandbox: Path) -> None:
    if command.needs:
        pytest.skip("needs " + "; ".join(NEEDS[n] for n in command.needs))
    p = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.text],
        cwd=sandbox,
        env=_env(sandbox.parent),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 0, (
        f"{command.id}: {command.text}\nexit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    )
