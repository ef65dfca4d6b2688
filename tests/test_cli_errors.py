"""User mistakes end the CLI with exit status 2 and a message that says what to change, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smalto.hf import save_pretrained
from smalto.model.mpt import MPTForCausalLM
from tests import forkrun
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def smalto(*args: str) -> subprocess.CompletedProcess:
    return forkrun.run(
        [sys.executable, "-m", "smalto", *args], capture_output=True, text=True, timeout=180, cwd=REPO
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, neox_tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(d_model=32, n_heads=2, n_layers=1, vocab_size=50432, no_bias=True)
    return save_pretrained(
        MPTForCausalLM(cfg), tmp_path_factory.mktemp("err") / "tiny", tokenizer=neox_tokenizer_dir
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:
    """Broken inputs: a truncated weights file, a metrics.jsonl with a bad line, a plain file, a text corpus."""
    tmp = tmp_path_factory.mktemp("broken")
    truncated = tmp / "truncated"
    truncated.mkdir()
    for f in model_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run = tmp / "run"
    run.mkdir()
    good = {"step": 1, "train/loss": 5.0, "train/lr": 1e-3, "throughput/tokens_per_s": 10.0}
    (run / "metrics.jsonl").write_text(json.dumps(good) + "\n" + '{"step": 2, "train/lo\n')
    plain = tmp / "plain.txt"
    plain.write_text("not a folder\n")
    corpus = tmp / "corpus.txt"
    corpus.write_text("hello world\n")
    badtok = tmp / "badtok"  # the model with a cut tokenizer.json
    badtok.mkdir()
    for f in model_dir.iterdir():
        (badtok / f.name).write_bytes(f.read_bytes())
    (badtok / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes()[:5000])
    gpt = tmp / "gpt"  # a transformers model (not MPT) whose weights are missing
    gpt.mkdir()
    for f in model_dir.glob("tokenizer*"):
        (gpt / f.name).write_bytes(f.read_bytes())
    (gpt / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2})
    )
    return {
        "truncated": truncated,
        "run": run,
        "plain": plain,
        "corpus": corpus,
        "tmp": tmp,
        "badtok": badtok,
        "gpt": gpt,
    }


# (case, argv with {model} {truncated} {run} {plain} {corpus} {tmp} {tok} {icl} placeholders, expected message)
CASES = [
    (
        "eval-dtype-int8",
        "eval {model} --tasks copa --data-root {icl} --dtype int8",
        "dtype 'int8' is not supported",
    ),
    (
        "generate-dtype-int8",
        "generate {model} -p hi --device cpu --dtype int8",
        "dtype 'int8' is not supported",
    ),
    ("generate-device", "generate {model} -p hi --device banana", "device 'banana' is not a device"),
    ("chat-device", "chat {model} --device banana", "device 'banana' is not a device"),
    (
        "eval-device",
        "eval {model} --tasks copa --data-root {icl} --device banana",
        "device 'banana' is not a device",
    ),
    ("truncated-safetensors", "generate {truncated} -p hi --device cpu", "model.safetensors"),
    ("eval-out-is-a-file", "eval {model} --tasks copa --data-root {icl} --out {plain}", "is a file"),
    ("plot-bad-line", "plot {run}", "metrics.jsonl line 2 is not valid JSON"),
    ("eval-max-seq-len-0", "eval {model} --tasks copa --data-root {icl} --max-seq-len 0", "--max-seq-len 0"),
    ("eval-limit-0", "eval {model} --tasks copa --data-root {icl} --limit 0", "--limit 0"),
    ("data-corrupt-tokenizer", "data {corpus} -o {tmp}/shards2 -t {badtok}", "badtok/tokenizer.json"),
    ("generate-corrupt-tokenizer", "generate {badtok} -p hi --device cpu", "badtok/tokenizer.json"),
    (
        "eval-corrupt-tokenizer",
        "eval {badtok} --tasks copa --data-root {icl} --device cpu",
        "badtok/tokenizer.json is unreadable",
    ),
    (
        "eval-transformers-no-weights",
        "eval {gpt} --tasks copa --data-root {icl} --device cpu",
        "transformers cannot load the model in",
    ),
    (
        "serve-quantize-group-not-dividing",
        "serve {model} --device cpu --quantize int4 --group-size 64",
        "group_size 64 does not divide the input size 32 of transformer.blocks.0.attn.Wqkv; choose a group size "
        "that divides it (32)",
    ),
    (
        "data-eos-not-in-vocab",
        "data {corpus} -o {tmp}/shards -t {tok} --eos-token <nonexist>",
        "'<nonexist>' is not in the vocabulary",
    ),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_exits_2_with_a_message(
    argv: str,
    message: str,
    model_dir: Path,
    files: dict[str, Path],
    shared_dir: Path,
    neox_tokenizer_dir: Path,
) -> None:
    names = {k: str(v) for k, v in files.items()}
    args = argv.format(model=model_dir, tok=neox_tokenizer_dir, icl=shared_dir / "icl_data", **names).split()
    r = smalto(*args)
    err = " ".join(r.stderr.split())  # rich wraps long lines
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and message in err, err


def test_plot_output_folder_is_created_or_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    row = {"step": 1, "train/loss": 5.0, "train/lr": 1e-3, "throughput/tokens_per_s": 10.0}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "step": 2}) + "\n")
    r = smalto("plot", str(run), "-o", str(tmp_path / "new" / "dir" / "x.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "dir" / "x.png").read_bytes()[:4] == b"\x89PNG"
    r = smalto("plot", str(run), "-o", f"{files['plain']}/x.png")
    assert r.returncode == 2 and "cannot create its folder" in " ".join(r.stderr.split()), r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_exits_2(model_dir: Path) -> None:
    for cmd in (["generate", str(model_dir), "-p", "hi"], ["eval", str(model_dir), "--tasks", "copa"]):
        r = smalto(*cmd, "--device", "cuda")
        assert r.returncode == 2 and "has no CUDA" in " ".join(r.stderr.split()), r.stderr[-3000:]


def test_long_dtype_names_and_top_k_0_is_off(model_dir: Path) -> None:
    from typer.testing import CliRunner

    from smalto.cli import app

    base = ["generate", str(model_dir), "-p", "Hello", "-n", "6", "--device", "cpu", "--seed", "3"]
    plain = smalto(*base)  # a real process: what a user sees
    assert plain.returncode == 0, plain.stderr
    for extra in (["--dtype", "float32"], ["--dtype", "fp32"], ["--top-k", "0"]):
        r = CliRunner().invoke(app, [*base, *extra])  # the same command in this process (no new interpreter)
        assert r.exit_code == 0, r.output
        assert r.stdout == plain.stdout, extra
