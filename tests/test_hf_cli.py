"""`smalto generate | chat | convert` run as a user runs them: a subprocess, its output and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smalto import load
from smalto.generate import generate
from smalto.hf import save_pretrained
from smalto.model.mpt import MPTForCausalLM
from smalto.tokenizer import load_tokenizer
from tests import forkrun
from tests.helpers import greedy_generate_args, tiny_config


def smalto(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return forkrun.run(
        [sys.executable, "-m", "smalto", *args], input=stdin, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, neox_tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50432, max_seq_len=64, no_bias=True, attn_config={"alibi": True})
    model = MPTForCausalLM(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)
    return save_pretrained(model, tmp_path_factory.mktemp("cli") / "tiny", tokenizer=neox_tokenizer_dir)


def test_generate_prints_the_greedy_completion(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    (ref,) = generate(load(model_dir), tok, ["Hello world"], max_new_tokens=8, temperature=0)
    r = smalto(*greedy_generate_args(model_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.text + "\n"
    assert "tokens/s" in r.stderr


def test_generate_several_prompts_from_file_and_stdin(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    r = smalto(
        "generate", str(model_dir), "-f", str(tmp_path / "p.txt"), "-n", "4", "--seed", "1", "--top-p", "0.9"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- ") == 2 and "--- 2 (length) ---" in r.stdout
    r = smalto("generate", str(model_dir), "-f", "-", "-n", "3", "--temperature", "0", stdin="a\nb\nc\n")
    assert r.returncode == 0 and r.stdout.count("--- ") == 3


def test_chat_piped_with_reset_and_exit(model_dir: Path) -> None:
    r = smalto(
        "chat", str(model_dir), "-n", "5", "--temperature", "0", stdin="hi\n/reset\nhi\n/exit\nnever read\n"
    )
    assert r.returncode == 0, r.stderr
    half = len(r.stdout) // 2  # /reset: the second "hi" sees the same empty history, so gets the same answer
    assert r.stdout[:half] == r.stdout[half:] and r.stdout.endswith("\n") and half > 1
    assert "history cleared" in r.stderr


def test_convert_casts_and_shards(model_dir: Path, tmp_path: Path) -> None:
    r = smalto("convert", str(model_dir), str(tmp_path / "out"), "--dtype", "bf16", "--shard-size", "2MB")
    assert r.returncode == 0, r.stderr
    assert "natively and with trust_remote_code" in r.stdout
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    a, b = load(model_dir), load(tmp_path / "out")
    assert b.dtype == torch.bfloat16
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "{model}"], "no prompt given"),
        (["generate", "/nonexistent/model", "-p", "x"], "does not exist"),
        # a budget the context cannot hold is clipped (tests/test_first_hour.py); a prompt that fills it is refused
        (["generate", "{model}", "-p", "x " * 80, "-n", "100"], "exceeds max_seq_len"),
        (["generate", "{model}", "-p", "x", "--top-p", "2"], "top_p"),
        (["convert", "{model}", "{tmp}/o", "--shard-size", "lots"], "shard size"),
        (["convert", "{model}", "{model}"], "different from the source"),
        (["chat", "{tmp}"], "not a model folder"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    model_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    r = smalto(*[a.format(model=model_dir, tmp=tmp_path) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
