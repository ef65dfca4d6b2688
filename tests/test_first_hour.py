"""A newcomer's first hour, run as a user runs it (`python -m smalto ...` in a fresh process, in temporary
folders): the demo never writes over the user's files, the context bounds the new-token budget instead of failing,
`generate --echo/--json`, install hints keep their brackets, `--help` shows flags as flags, `--print-config`,
one vocabulary across commands, and a val/ split is never written empty."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smalto.demo import stdlib_files, train_tokenizer
from tests import forkrun

REPO = Path(__file__).resolve().parents[1]


def smalto(*args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None):
    return forkrun.run(
        [sys.executable, "-m", "smalto", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=180,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "200",
            **(env or {}),
        },
    )


def refused(p: subprocess.CompletedProcess) -> str:
    """The message of a refusal (exit 2, no traceback), without the line breaks rich adds."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr[-3000:]
    return " ".join(p.stderr.split())


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- item 1: the demo writes only inside its run folder, never over what the user named ----


def test_the_demo_never_writes_over_the_users_files(tmp_path: Path, neox_tokenizer_dir: Path) -> None:
    mydata = tmp_path / "mydata"
    (mydata / "train").mkdir(parents=True)
    (mydata / "train" / "index.json").write_text('{"version": 2, "shards": []}')
    (mydata / "notes.txt").write_text("mine")
    tokcopy = tmp_path / "tokcopy"
    shutil.copytree(neox_tokenizer_dir, tokcopy)
    before = digests(tmp_path)

    err = refused(smalto("train", "tiny", "data.sources=[{path: ./mydata}]", cwd=tmp_path))
    assert "data.sources[0].path = mydata is outside the run folder runs/tiny" in err
    assert "prepare=null" in err
    err = refused(smalto("train", "tiny", "tokenizer=./tokcopy", cwd=tmp_path))
    assert "tokenizer = tokcopy is outside the run folder" in err
    nope = tmp_path / "nope"
    err = refused(smalto("train", f"data.sources=[{{path: {nope}}}]", cwd=tmp_path))
    assert f"{nope} is outside the run folder" in err and not nope.exists()

    # inside the run folder, a folder the demo did not make is not written over either
    inside = tmp_path / "runs" / "tiny" / "tok"
    shutil.copytree(neox_tokenizer_dir, inside)
    before_inside = digests(inside)
    err = refused(smalto("train", "tokenizer=runs/tiny/tok", cwd=tmp_path))
    assert "tokenizer = runs/tiny/tok already exists and was not made by `prepare: stdlib`" in err
    assert digests(inside) == before_inside
    shutil.rmtree(tmp_path / "runs")
    assert digests(tmp_path) == before  # nothing of the user's changed, nothing else was written


def test_ctrl_c_during_the_demos_preparation_leaves_nothing_half_written(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "smalto", "train"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 120
    while not list(run.glob(".stdlib.partial-*")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list(run.glob(".stdlib.partial-*")), "the preparation never started"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert sorted(x.name for x in run.iterdir()) == []  # no partial folder, corpus, tokenizer or shards


# ---- item 8: a val/ split is never written empty ----


def test_data_writes_no_empty_val_split(tmp_path: Path, neox_tokenizer_dir: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(8)))
    p = smalto(
        "data", docs, "-o", "out", "-t", neox_tokenizer_dir, "--seq-len", "64", "--val-fraction", "0.01",
        "--shard-size", "1MB", cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    err = " ".join(p.stderr.split())
    assert "no val/ split written: --val-fraction 0.01 of 8 documents gave 0 documents" in err
    assert "100%" in err  # the progress bar counts the input's bytes
    assert (tmp_path / "out" / "train" / "index.json").is_file() and not (tmp_path / "out" / "val").exists()
    meta = json.loads((tmp_path / "out" / "smalto_data.json").read_text())
    assert list(meta["sources"][0]["splits"]) == ["train"]


# ---- a tiny HF folder: items 6, 9 (length warning), 12 ----


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    import smalto
    from smalto.model.mpt import MPTForCausalLM
    from tests.helpers import tiny_config

    root = tmp_path_factory.mktemp("hf")
    texts = [p.read_text(errors="replace") for p in stdlib_files(200_000)]
    train_tokenizer(texts, 384, root / "tok", max_len=48)  # model_max_length below the model's context
    model = MPTForCausalLM(tiny_config(vocab_size=384, max_seq_len=96, attn_config={"alibi": True}))
    smalto.save(model, root / "hf", tokenizer=str(root / "tok"))
    return root / "hf"


def test_safetensors_files_have_the_usual_mode(hf_folder: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in hf_folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~mask


def test_chat_clips_the_answer_budget_to_the_context(hf_folder: Path, tmp_path: Path) -> None:
    p = smalto("chat", hf_folder, "--seed", "1", cwd=tmp_path, stdin="hi\nand again\n")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("note: max new tokens 512 clipped to") == 1
    assert "the model's context is 96 tokens" in p.stderr


def test_generate_clips_echoes_and_prints_json(hf_folder: Path, tmp_path: Path) -> None:
    long_prompt = "def parse(self, text):\n    return " * 4  # longer than the tokenizer's model_max_length
    p = smalto(
        "generate", hf_folder, "-p", long_prompt, "-n", "500", "--json", "--seed", "0", "--temperature", "0",
        cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "note: max new tokens 500 clipped to" in p.stderr
    assert "Token indices sequence length" not in p.stderr  # smalto bounds lengths itself
    (line,) = p.stdout.splitlines()
    row = json.loads(line)
    assert set(row) == {
        "prompt", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "seconds",
        "first_token_seconds",
    }  # fmt: skip
    assert row["prompt"] == long_prompt and row["completion_tokens"] == len(row["token_ids"])
    assert row["prompt_tokens"] + row["completion_tokens"] <= 96
    assert row["finish_reason"] in ("length", "eos") and row["seconds"] >= row["first_token_seconds"] > 0

    p = smalto("generate", hf_folder, "-p", "import os\n", "-n", "5", "--echo", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("import os\n"), p.stderr[-2000:]
    p = smalto("generate", hf_folder, "-p", "a = ", "-p", "b = ", "-n", "3", "--echo", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    # sampled: a prompt may end at EOS before its 3 tokens
    assert re.search(
        r"^--- 1 \((length|eos)\) ---\na = .*^--- 2 \((length|eos)\) ---\nb = ", p.stdout, re.M | re.S
    )


# ---- items 10, 11: output people can read ----


def test_install_hints_keep_their_brackets(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    p = smalto("plot", tmp_path, cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path / 'site'}:{REPO}"})
    assert "pip install 'smalto[plot]'" in refused(p)


COMMANDS = (
    "data",
    "eval",
    "train",
    "finetune",
    "dpo",
    "reward",
    "ppo",
    "serve",
    "plot",
    "generate",
    "chat",
    "convert",
)


def test_help_shows_flags_as_flags_and_one_vocabulary(tmp_path: Path) -> None:
    from smalto.config import recipe_names

    helps = {c: smalto(c, "--help", cwd=tmp_path).stdout for c in COMMANDS}
    for command, text in helps.items():
        assert "<bool>" not in text, command
    flat = {c: " ".join(t.split()) for c, t in helps.items()}
    assert "--no-wrap One document per sample" in flat["data"]
    assert "--echo Print each prompt" in flat["generate"]
    assert "docs/train.md" in flat["train"] and "--print-config" in flat["train"]
    from smalto.config import find_recipe, read_yaml

    def command_of(recipe: dict) -> str:  # which command runs a shipped recipe: its help names it
        return next(
            (c for c in ("ppo", "reward", "dpo") if c in recipe),
            "finetune" if "base_model" in recipe else "train",
        )

    by_command: dict[str, set[str]] = {}
    for name in recipe_names():
        by_command.setdefault(command_of(read_yaml(find_recipe(name).read_text())), set()).add(name)
    assert set(by_command) == {"train", "finetune", "dpo", "reward", "ppo"}
    for command, names in by_command.items():
        assert all(name in flat[command] for name in names), command
    for command in ("data", "eval", "generate", "chat"):  # -t is the tokenizer everywhere
        assert "-t, --tokenizer" in flat[command], command
    dtypes = "bf16 (bfloat16) | fp16 (float16) | fp32 (float32)"
    for command in ("eval", "generate", "chat", "convert"):
        assert dtypes in flat[command], command
    for command in ("data", "convert"):
        assert "--shard-size <str> Largest file, e.g. 5GB, 500MB, 2GiB or a number of bytes" in flat[command]


def test_print_config_prints_the_resolved_recipe_and_exits(tmp_path: Path) -> None:
    from smalto.config import load_config

    p = smalto("train", "tiny", "train.max_duration=7ba", "--print-config", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout) == load_config("tiny", ["train.max_duration=7ba"]).to_dict()
    assert not (tmp_path / "runs").exists()
