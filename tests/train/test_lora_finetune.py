"""`smalto finetune` with a `lora` section: adapters train on a frozen base, checkpoints hold only the adapters
and their optimizer state (resume is bit-exact), the export is PEFT's adapter folder (transformers + PEFT compute
the same logits), and FSDP2 over two processes trains the same adapters."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import smalto
from smalto.errors import ConfigError
from tests.train.conftest import losses, run_smalto
from tests.train.test_finetune import base, recipe, write  # noqa: F401  (base is a fixture)

LORA = {"r": 4, "alpha": 8, "targets": ["Wqkv", "out_proj", "up_proj", "down_proj"]}


def lora_recipe(folder: Path, tmp: Path, run: str, **train) -> dict:
    rec = recipe(folder, tmp, run, **train)
    rec["lora"] = dict(LORA)
    rec["optimizer"]["lr"] = 1e-2
    return rec


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):  # noqa: F811
    from smalto.finetune import finetune

    tmp = tmp_path_factory.mktemp("lora")
    straight = finetune(write(lora_recipe(base, tmp, "straight", activation_checkpointing=True), tmp, "s"))
    split = write(lora_recipe(base, tmp, "split"), tmp, "split")
    first = finetune(split, ["train.stop_after=3"])
    second = finetune(split)
    return {"tmp": tmp, "straight": straight, "first": first, "second": second}


def test_adapters_train_and_export_as_peft(runs, base) -> None:  # noqa: F811
    r = runs["straight"]
    assert r.train.stopped is None and r.train.steps == 6
    assert r.eval_after < r.eval_before - 0.3
    folder = Path(r.train.hf_folder)
    names = sorted(p.name for p in folder.iterdir())
    assert (
        "adapter_config.json" in names and "adapter_model.safetensors" in names and "tokenizer.json" in names
    )
    assert not any(n.startswith("model") for n in names)  # an adapter, not a model
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(base))
    assert (
        len(load_file(str(folder / "adapter_model.safetensors"))) == 2 * 4 * 2
    )  # A, B × 4 targets × 2 layers
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), folder)
    ours = smalto.load(folder)  # the adapter folder names its base
    x = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=1e-5, rtol=0)
        plain = smalto.load(base)(x).logits
        assert (ours(x).logits - plain).abs().max() > 1e-3  # the adapters learned something
    assert len(r.samples) == 2  # answered by base + adapter


def test_checkpoints_hold_only_adapters_and_resume_exactly(runs) -> None:
    tmp = runs["tmp"]
    assert runs["first"].train.steps == 3 and runs["second"].train.steps == 6
    assert losses(tmp / "split") == losses(tmp / "straight")  # activation checkpointing changes no number
    step = tmp / "split" / "checkpoints" / "step_00000006"
    keys = list(FileSystemReader(str(step)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == 16 and all(".lora." in k for k in model_keys)
    a = load_file(str(tmp / "split" / "hf" / "adapter_model.safetensors"))
    b = load_file(str(tmp / "straight" / "hf" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_keys_are_validated(base, tmp_path) -> None:  # noqa: F811
    from smalto.finetune import load_finetune_config

    path = write(lora_recipe(base, tmp_path, "bad"), tmp_path, "bad")
    with pytest.raises(ConfigError, match=r"unknown key lora.rank; allowed keys: r, alpha, rslora, dropout"):
        load_finetune_config(path, ["lora.rank=4"])
    with pytest.raises(
        ConfigError, match=r"lora.base_dtype = 'int4' is not allowed; choose one of: bf16, nf4"
    ):
        load_finetune_config(path, ["lora.base_dtype=int4"])
    cfg = load_finetune_config(path, ["lora.targets=all-linear", "lora.rslora=true"])
    assert cfg.lora.targets == "all-linear" and cfg.lora.scaling == 8 / 2
    p = run_smalto(["finetune", path, "lora.targets=[qkv]"], check=False)
    assert p.returncode == 2 and "lora.targets = ['qkv'] matches no layer" in p.stderr
    assert "Traceback" not in p.stderr


def test_fsdp2_two_processes_train_the_same_adapters(runs, base, tmp_path) -> None:  # noqa: F811
    rec = lora_recipe(base, tmp_path, "fsdp")
    rec["finetune"]["samples"] = 0
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(rec))
    run_smalto(["finetune", str(path)], nproc=2)
    ours = losses(tmp_path / "fsdp")
    assert ours == pytest.approx(losses(runs["tmp"] / "split"), abs=1e-4)
    a = load_file(str(tmp_path / "fsdp" / "hf" / "adapter_model.safetensors"))
    b = load_file(str(runs["tmp"] / "straight" / "hf" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_shipped_lora_recipes(tmp_path, neox_tokenizer_dir) -> None:
    from smalto.finetune import load_finetune_config
    from tests.model.helpers import MPT_7B_CONFIG_JSON

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MPT_7B_CONFIG_JSON))
    args = [f"base_model={folder}", f"tokenizer={neox_tokenizer_dir}"]
    c = load_finetune_config("mpt-7b-instruct-lora", args)
    lora = c.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.base_dtype) == (16, 32, 0.05, "bf16")
    assert lora.targets == ["Wqkv", "out_proj", "up_proj", "down_proj"]
    assert (c.optimizer.lr, c.data.seq_len, c.train.micro_batch_size) == (2e-4, 2048, 4)
    assert c.train.activation_checkpointing == "selective"  # the measured ≥ 13,400 tok/s in ≤ 20 GiB
    for name in ("mpt-7b-chat-qlora", "mpt-30b-instruct-qlora"):
        q = load_finetune_config(name, args)
        assert (q.lora.base_dtype, q.lora.targets, q.data.seq_len) == ("nf4", "all-linear", 2048)
