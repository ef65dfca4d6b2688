"""`smalto eval` end to end on saved folders, and the lm-eval adapter fully offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smalto.eval.prompts import Request
from smalto.eval.scorer import score_full
from tests import forkrun
from tests.eval.conftest import direct_mean_ce


def _smalto(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return forkrun.run(
        [sys.executable, "-m", "smalto", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def mpt_dir(tmp_path_factory, mpt, neox_tokenizer_dir):
    from smalto.hf import save_pretrained

    d = tmp_path_factory.mktemp("mpt")
    save_pretrained(mpt, d, tokenizer=str(neox_tokenizer_dir))
    return d


def test_cli_runs_tasks_and_writes_report(mpt_dir, data_root, tmp_path):
    out = tmp_path / "out"
    r = _smalto(
        "eval",
        str(mpt_dir),
        "--tasks",
        "copa,jeopardy_small",
        "--limit",
        "4",
        "--out",
        str(out),
        "--log-samples",
        "--data-root",
        str(data_root),
        "--fewshot",
        "0,1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert [(t["label"], t["num_fewshot"]) for t in res["tasks"]] == [
        ("copa", 0),
        ("copa", 1),
        ("jeopardy_small", 0),
        ("jeopardy_small", 1),
    ]
    samples = [json.loads(x) for x in (out / "samples" / "copa_1-shot.jsonl").read_text().splitlines()]
    assert (
        len(samples) == 4 and {"prompt", "options", "mean_ce", "prediction", "correct"} <= samples[0].keys()
    )
    assert "copa" in r.stdout


def test_cli_default_data_root_and_hf_model(tmp_path, gpt2, neox_tokenizer_dir, shared_dir):
    """A plain transformers model folder, run from the repo root so ../shared/icl_data is found by default."""
    from transformers import AutoTokenizer

    d = tmp_path / "gpt2"
    gpt2.save_pretrained(d)
    AutoTokenizer.from_pretrained(str(neox_tokenizer_dir)).save_pretrained(d)
    repo = (
        shared_dir.parent / "main"
        if (shared_dir.parent / "main").is_dir()
        else Path(__file__).resolve().parents[2]
    )
    r = _smalto("eval", str(d), "--tasks", "winograd", "--limit", "3", cwd=repo)
    assert r.returncode == 0, r.stderr
    assert "winograd" in r.stdout


def test_cli_errors_exit_2_before_work(mpt_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in mpt_dir.iterdir():
        if f.name.startswith(("config", "model")):
            (bare / f.name).write_bytes(f.read_bytes())
    r = _smalto("eval", str(bare), "--tasks", "copa", "--data-root", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "no tokenizer" in r.stderr and "--tokenizer" in r.stderr
    r = _smalto("eval", str(mpt_dir), "--tasks", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr and "arc_easy" in r.stderr


def test_lm_eval_adapter_tokenizes_a_llama_text_as_hflm(tmp_path):
    """With a LLaMA tokenizer the adapter's token requests are lm-eval's own (HFLM.tok_encode and _encode_pair,
    run on the same tokenizer): the tokenizer's BOS before a context, none inside a continuation; add_bos_token
    False leaves it out, as HFLM's option does."""
    from types import SimpleNamespace

    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM

    from smalto.eval.lm_eval_adapter import SmaltoLM
    from smalto.model.mpt import MPTForCausalLM
    from tests.helpers import tiny_config
    from tests.test_llama import V, byte_fallback_tokenizer

    tok = byte_fallback_tokenizer(tmp_path)
    model = MPTForCausalLM(tiny_config(vocab_size=V))
    for option in (None, False):
        lm = SmaltoLM(model=model, tokenizer=tok, add_bos_token=option)
        ref = SimpleNamespace(
            tokenizer=tok, add_bos_token=option, prefix_token_id=tok.bos_token_id, backend="causal"
        )
        ref.tok_encode = lambda s, add_special_tokens=None, ref=ref, **_: HFLM.tok_encode(
            ref, s, add_special_tokens
        )
        for ctx, cont in [
            ("the quick brown", " fox"),
            ("hello ", "world, hello there"),
            ("<s>the lazy", " dog"),
        ]:
            got = lm._pair(ctx, cont)
            assert (got.context, got.continuation) == tuple(TemplateLM._encode_pair(ref, ctx, cont)), (
                option,
                ctx,
            )
        assert lm._encode("the lazy dog") == ref.tok_encode("the lazy dog")
        assert (lm._encode("the lazy dog")[0] == tok.bos_token_id) is (option is None)


def test_lm_eval_adapter_matches_smalto(mpt, tokenizer, tmp_path):
    import lm_eval  # a dev dependency: the test must run, not skip
    from lm_eval.api.instance import Instance

    from smalto.eval.lm_eval_adapter import SmaltoLM

    lm = SmaltoLM(model=mpt, tokenizer=tokenizer, batch_size=3)
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Lyon, of course"),
        ("2 + 2 =", " 4"),
        ("", "hello world"),
        ("Trailing space ", "here"),
    ]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (lp, _) in zip(pairs, got, strict=True):
        ctx, cont = (ctx.rstrip(), ctx[len(ctx.rstrip()) :] + cont)
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        t = tokenizer(cont, add_special_tokens=False)["input_ids"]
        assert lp == pytest.approx(-direct_mean_ce(mpt, c, t) * len(t), abs=1e-3)
        # smalto's own scorer on the same tokens
        assert lp == pytest.approx(score_full(mpt, [Request(c, t)], 0)[0].logprob, abs=1e-4)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("word " * 200,), 0)])
    assert rolling[0] < 0

    # a local task, run by the harness itself, offline
    (tmp_path / "data.jsonl").write_text(
        "".join(
            json.dumps({"q": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2}) + "\n"
            for i in range(6)
        )
    )
    (tmp_path / "even.yaml").write_text(
        "task: smalto_even\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        + str(tmp_path / "data.jsonl")
        + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}} Answer:'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm, tasks=["smalto_even"], task_manager=TaskManager(include_path=str(tmp_path))
    )
    assert 0.0 <= out["results"]["smalto_even"]["acc,none"] <= 1.0
