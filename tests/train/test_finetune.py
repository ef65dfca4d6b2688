"""`smalto finetune` on the training loop: the held-out loss falls, a resumed run is bit-exact, the export chats
as transformers renders and generates it, and recipe mistakes exit 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from smalto.data.templates import CHATML_TEMPLATE, INSTRUCT_TEMPLATE
from tests.helpers import tiny_config
from tests.train.conftest import losses, run_smalto

WORDS = ["red", "blue", "green", "black", "white", "gold"]


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory) -> Path:
    """A random tiny MPT that transformers loads natively, with the tiny stdlib tokenizer, as an HF folder."""
    from smalto.hf.save import save_pretrained
    from smalto.model.mpt import MPTForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(
        vocab_size=384, max_seq_len=128, no_bias=True, attn_config={"alibi": True, "attn_impl": "sdpa"}
    )
    folder = tmp_path_factory.mktemp("ft") / "base"
    save_pretrained(MPTForCausalLM(cfg).eval(), str(folder), tokenizer=tiny_data["tokenizer"])
    return folder


def dolly_rows(path: Path) -> str:
    rows = [
        {
            "instruction": f"Name colour {i}.",
            "context": "",
            "response": f"The colour is {WORDS[i % len(WORDS)]}.",
        }
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(base: Path, tmp: Path, run: str, **train) -> dict:
    return {
        "name": run,
        "run_dir": str(tmp / run),
        "seed": 5,
        "base_model": str(base),
        "data": {
            "sources": [{"path": dolly_rows(tmp / "dolly.jsonl"), "preprocessing": "dolly"}],
            "eval_fraction": 0.2,
            "seq_len": 128,
        },
        "optimizer": {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.0},
        "scheduler": {"name": "linear", "warmup": "1ba", "alpha_f": 0.0},
        "train": {
            "max_duration": "6ba",
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "device": "cpu",
            "precision": "fp32",
            "eval_first": True,
            "eval_interval": "3ba",
            "eval_batches": 2,
            **train,
        },
        "finetune": {"samples": 2, "sample_tokens": 8},
        "checkpoint": {"interval": "100ba", "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False},
    }


def write(rec: dict, tmp: Path, name: str) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return str(path)


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory):
    """A straight 6-step run (in this process) and the same run stopped after 3 steps and resumed."""
    from smalto.finetune import finetune

    tmp = tmp_path_factory.mktemp("runs")
    straight = finetune(write(recipe(base, tmp, "straight"), tmp, "straight"))
    split = write(recipe(base, tmp, "split"), tmp, "split")
    first = finetune(split, ["train.stop_after=3"])
    second = finetune(split)
    return {"tmp": tmp, "straight": straight, "first": first, "second": second}


def test_held_out_loss_falls_and_the_export_chats(finetuned):
    r = finetuned["straight"]
    assert r.train.stopped is None and r.train.steps == 6
    assert r.eval_before is not None and r.eval_after is not None and r.eval_after < r.eval_before - 0.5
    assert len(r.samples) == 2 and r.samples[0][0].endswith("### Response:\n")
    folder = Path(r.train.hf_folder)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == INSTRUCT_TEMPLATE
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 0
    run = finetuned["tmp"] / "straight"
    assert losses(run, "eval/loss")[0] == pytest.approx(r.eval_before)  # step 0: before the first update
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0


def test_resume_mid_epoch_is_bit_exact(finetuned):
    assert finetuned["first"].train.stopped == "stop_after" and finetuned["first"].train.steps == 3
    tmp = finetuned["tmp"]
    assert losses(tmp / "split") == losses(tmp / "straight")  # every step, floats compared exactly
    a = (tmp / "straight" / "hf" / "model.safetensors").read_bytes()
    assert a == (tmp / "split" / "hf" / "model.safetensors").read_bytes()


def _hf_greedy(folder: Path, messages: list[dict], n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def test_transformers_chat_template_and_generate_match_smalto(finetuned, base, tmp_path):
    from smalto.finetune import load_finetune_config
    from smalto.train.finetune import write_chat_files

    folder = Path(finetuned["straight"].train.hf_folder)
    question = "Name colour 3."
    expected = _hf_greedy(folder, [{"role": "user", "content": question}], 8)
    assert expected.strip()
    p = run_smalto(
        ["generate", str(folder), "-p", question, "--template", "chat", "--temperature", "0", "-n", "8"]
    )
    assert p.stdout.rstrip("\n") == expected
    from smalto.chat import template_prompt
    from smalto.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)  # the instruct template is the export's chat template
    assert template_prompt(tok, question, "instruct") == template_prompt(tok, question, "chat")
    # a chat recipe writes ChatML; `smalto chat` answers as transformers does
    chat_rec = recipe(base, tmp_path, "chat")
    chat_rec["data"]["sources"][0]["preprocessing"] = "chat"
    cfg = load_finetune_config(write(chat_rec, tmp_path, "chat"))
    chat_folder = tmp_path / "chat_export"
    shutil.copytree(folder, chat_folder)
    write_chat_files(cfg, chat_folder)
    assert json.loads((chat_folder / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    expected = _hf_greedy(chat_folder, [{"role": "user", "content": question}], 8)
    p = run_smalto(["chat", str(chat_folder), "--temperature", "0", "-n", "8"], stdin=question + "\n")
    assert p.stdout.strip() == expected.split("<|im_end|>")[0].strip()


def test_recipe_mistakes_are_named(base, tmp_path):
    from smalto.errors import CheckpointError, ConfigError
    from smalto.finetune import load_finetune_config

    rec = recipe(base, tmp_path, "bad")
    rec["finetune"]["templat"] = "chatml"
    with pytest.raises(
        ConfigError, match=re.escape("unknown key finetune.templat; allowed keys: template, samples")
    ):
        load_finetune_config(write(rec, tmp_path, "bad"))
    with pytest.raises(CheckpointError, match="is not a model folder smalto can read"):
        load_finetune_config(write(recipe(tmp_path, tmp_path, "nomodel"), tmp_path, "nomodel"))
    # through the CLI: exit 2, the file, line and field, and no run folder written
    rec = recipe(base, tmp_path, "badrow")
    with open(rec["data"]["sources"][0]["path"], "a") as f:
        f.write(json.dumps({"instruction": "no response"}) + "\n")
    p = run_smalto(["finetune", write(rec, tmp_path, "badrow")], check=False)
    msg = " ".join(p.stderr.split())
    assert p.returncode == 2 and "dolly.jsonl:41: field 'response' or 'output' is missing" in msg
    assert "data.on_error: skip" in msg and "Traceback" not in msg and not (tmp_path / "badrow").exists()


def test_shipped_recipes_have_the_published_settings(tmp_path, neox_tokenizer_dir):
    from smalto.config import load_config
    from smalto.errors import ConfigError
    from smalto.finetune import load_finetune_config
    from tests.model.helpers import MPT_7B_CONFIG_JSON

    def base(seq: int) -> str:
        folder = tmp_path / f"base{seq}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**MPT_7B_CONFIG_JSON, "max_seq_len": seq}))
        return str(folder)

    args = [f"tokenizer={neox_tokenizer_dir}"]
    c = load_finetune_config("mpt-7b-instruct", [f"base_model={base(2048)}", *args])
    o, s, t = c.optimizer, c.scheduler, c.train
    assert (o.name, o.lr, o.betas, o.weight_decay) == ("adamw", 5e-6, [0.9, 0.999], 0.0)
    assert (s.name, s.warmup, s.alpha_f) == ("linear", "50ba", 0.0)
    assert (t.max_duration, t.global_batch_size, t.grad_clip, c.data.seq_len) == ("2ep", 48, 1.0, 2048)
    assert t.compile and t.activation_checkpointing  # the GPU recipes compile each block
    assert (
        c.model.d_model == 4096 and c.model.attn_config.attn_uses_sequence_id
    )  # packing keeps examples apart
    assert c.checkpoint.load_from == c.base_model
    chat = load_finetune_config("mpt-7b-chat", [f"base_model={base(2049)}", *args])
    assert chat.finetune.template == "chatml" and chat.data.sources[0].preprocessing == "chat"
    c30 = load_finetune_config("mpt-30b-instruct", [f"base_model={base(8192)}", *args])
    assert (c30.data.seq_len, c30.optimizer.betas, c30.optimizer.lr, c30.train.global_batch_size) == (
        8192,
        [0.9, 0.95],
        9.65e-6,
        72,
    )
    with pytest.raises(ConfigError, match="is a finetuning recipe"):
        load_config("mpt-7b-instruct")
    for recipe, command in (("tiny-reward", "reward"), ("tiny-ppo", "ppo"), ("tiny-dpo", "dpo")):
        with pytest.raises(ConfigError, match=rf"run `smalto {command} {recipe}`"):
            load_config(recipe)


LLAMA_7B_CONFIG_JSON = {  # meta-llama/Llama-2-7b-hf's config.json, the parts a model config reads
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def test_llama_recipes_have_alpaca_and_vicuna_settings(tmp_path, neox_tokenizer_dir):
    from smalto.data.templates import VICUNA_TEMPLATE
    from smalto.finetune import load_finetune_config
    from smalto.train.finetune import finetune_tokenizer, template_name

    base = tmp_path / "llama-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA_7B_CONFIG_JSON))
    args = [f"base_model={base}", f"tokenizer={neox_tokenizer_dir}"]
    alpaca = load_finetune_config("llama-7b-alpaca", args)
    o, s, t = alpaca.optimizer, alpaca.scheduler, alpaca.train
    assert (o.name, o.lr, o.weight_decay, s.name, s.warmup) == ("adamw", 2e-5, 0.0, "cosine", "0.03dur")
    assert (t.max_duration, t.global_batch_size, alpaca.data.seq_len) == ("3ep", 128, 512)
    assert alpaca.data.sources[0].preprocessing == "alpaca" and alpaca.model.ffn_config.ffn_type == "mptglu"
    vicuna = load_finetune_config("vicuna-7b", args)
    assert (vicuna.data.seq_len, vicuna.train.global_batch_size, vicuna.optimizer.lr) == (2048, 128, 2e-5)
    assert template_name(vicuna) == "vicuna"
    lora = load_finetune_config("llama-7b-alpaca-lora", args)  # tloen/alpaca-lora's settings
    assert (lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.lora.targets) == (
        8,
        16,
        0.05,
        ["q_proj", "v_proj"],
    )
    assert (lora.optimizer.lr, lora.train.global_batch_size, lora.data.seq_len, lora.data.target_prompts) == (
        3e-4,
        128,
        256,
        "all",
    )
    # a tokenizer without a chat template trains the chats in the template the export declares
    assert finetune_tokenizer(vicuna).chat_template == VICUNA_TEMPLATE
