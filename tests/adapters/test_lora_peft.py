"""LoRA against PEFT on transformers' MptForCausalLM / LlamaForCausalLM: one training step, adapters written by
either side and read by the other, merge, and the refusals of adapters smalto does not compute."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import smalto
from smalto.adapters import LoraConfig, adapters_disabled, apply_lora, merge, unmerge
from smalto.adapters.lora import adapters, merged_model
from smalto.adapters.peft import load_adapter, save_adapter
from smalto.errors import CheckpointError, ConfigError
from smalto.hf import save_pretrained
from tests.test_hf import NATIVE, ids, make_model
from tests.test_llama import hf_model

FOUR = ["Wqkv", "out_proj", "up_proj", "down_proj"]


def mpt_base(folder: Path) -> Path:
    save_pretrained(make_model(NATIVE), folder)
    return folder


def randomize_b(model: torch.nn.Module, seed: int = 3) -> None:
    """B starts at zero; a random B makes every product of the adapter count in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model):
            a.lora_B.weight.copy_(0.1 * torch.randn(a.lora_B.weight.shape, generator=g))


def test_step_zero_is_the_base_model() -> None:
    model = make_model(NATIVE)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    names = apply_lora(model, LoraConfig(r=4, alpha=16))
    assert names == ["transformer.blocks.0.attn.Wqkv", "transformer.blocks.1.attn.Wqkv"]  # PEFT's MPT default
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"transformer.blocks.{i}.attn.Wqkv.lora.Wqkv.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    }
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_one_step_equals_peft(tmp_path: Path) -> None:
    """Same base, same adapter weights, same batch: loss, adapter gradients and the AdamW update agree."""
    base = mpt_base(tmp_path / "base")
    model = smalto.load(base).train()
    cfg = LoraConfig(r=4, alpha=8, targets=FOUR, rslora=True)
    apply_lora(model, cfg)
    randomize_b(model)
    save_adapter(model, tmp_path / "ad", cfg, base=str(base))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "ad", is_trainable=True).train()
    x = ids(T=16)
    labels = x.clone()
    labels[:, :5] = -100
    ours = model(x, labels=labels).loss
    theirs = ref(input_ids=x, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours.backward()
    theirs.backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert len(peft_grads) == 16
    for a in adapters(model):
        for ab in ("A", "B"):
            g = getattr(a, f"lora_{ab}").weight.grad
            torch.testing.assert_close(
                g, peft_grads[f"base_model.model.{a.name}.lora_{ab}.weight"], atol=1e-5, rtol=0
            )
    assert all(
        p.grad is None for p in model.parameters() if not p.requires_grad
    )  # no weight-gradient products
    for m in (model, ref):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        opt.step()
    save_adapter(model, tmp_path / "after", cfg)
    ref.save_pretrained(tmp_path / "peft_after")
    mine, theirs_sd = (
        load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "after", tmp_path / "peft_after")
    )
    assert mine.keys() == theirs_sd.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs_sd[k], atol=1e-5, rtol=0)


def test_smalto_adapter_loads_in_peft(tmp_path: Path) -> None:
    base = mpt_base(tmp_path / "base")
    model = smalto.load(base)
    cfg = LoraConfig(
        r=2, alpha=6, targets="transformer\\.blocks\\.1\\..*(Wqkv|up_proj)", modules_to_save=["norm_f"]
    )
    apply_lora(model, cfg)
    randomize_b(model)
    with torch.no_grad():
        model.transformer.norm_f.weight.mul_(1.5)
    save_adapter(model, tmp_path / "ad", cfg, base=str(base))
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (
        written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM" and written["lora_alpha"] == 6
    )
    assert written["target_modules"] == cfg.targets and written["base_model_name_or_path"] == str(base)
    assert sorted(load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))) == [
        "base_model.model.transformer.blocks.1.attn.Wqkv.lora_A.weight",
        "base_model.model.transformer.blocks.1.attn.Wqkv.lora_B.weight",
        "base_model.model.transformer.blocks.1.ffn.up_proj.lora_A.weight",
        "base_model.model.transformer.blocks.1.ffn.up_proj.lora_B.weight",
        "base_model.model.transformer.norm_f.weight",
    ]
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad"
    )
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            smalto.load(base, adapter=tmp_path / "ad")(x).logits, ref(x).logits, atol=1e-5, rtol=0
        )


@torch.no_grad()
def test_peft_adapter_loads_in_smalto_and_merges(tmp_path: Path) -> None:
    base = mpt_base(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    ref = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    ref.save_pretrained(tmp_path / "ad")
    model = smalto.load(base)
    load_adapter(model, tmp_path / "ad")
    assert len(list(adapters(model))) == 8  # all-linear: the blocks' four projections, not the tied head
    x = ids()
    unmerged = model(x).logits
    torch.testing.assert_close(unmerged, ref(x).logits, atol=1e-5, rtol=0)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x).logits, smalto.load(base)(x).logits, atol=0, rtol=0)
    merge(model)
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)
    merged_model(model)
    assert type(model.transformer.blocks[0].attn.Wqkv) is torch.nn.Linear
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=0)


@torch.no_grad()
def test_llama_q_v_are_slices_of_fused_wqkv(tmp_path: Path) -> None:
    """PEFT's LLaMA default (q_proj, v_proj; grouped-query k/v) on smalto's fused Wqkv, both ways."""
    hf = hf_model()
    hf.save_pretrained(tmp_path / "base")
    torch.manual_seed(2)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    ref.save_pretrained(tmp_path / "ad")
    model = smalto.load(tmp_path / "base")
    load_adapter(model, tmp_path / "ad")
    wqkv = model.transformer.blocks[0].attn.Wqkv
    assert sorted((k, a.rows) for k, a in wqkv.lora.items()) == [("q_proj", (0, 64)), ("v_proj", (96, 128))]
    x = ids(vocab=300)
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path / "back", LoraConfig(r=4, alpha=8))
    again = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "back")
    torch.testing.assert_close(again(x).logits, ref(x).logits, atol=1e-5, rtol=0)


def _edit(folder: Path, **changes) -> Path:
    file = folder / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "IA3"}, r"peft_type = 'IA3' is not supported; smalto reads LORA"),
        ({"use_dora": True}, r"use_dora = True is not supported"),
        ({"bias": "all"}, r"bias = 'all' is not supported \(smalto computes plain LoRA: bias = 'none'\)"),
        (
            {"target_modules": ["q_proj"]},
            r"target_modules = \['q_proj'\] matches no layer of this mpt model; .* end in: Wqkv, down_proj, out_proj, up_proj",
        ),
    ],
)
def test_refusals_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    base = mpt_base(tmp_path / "base")
    model = smalto.load(base)
    apply_lora(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "ad", LoraConfig(r=2))
    with pytest.raises(CheckpointError, match=message):
        load_adapter(smalto.load(base), _edit(tmp_path / "ad", **change))


def test_adapter_of_another_base_is_refused(tmp_path: Path) -> None:
    base = mpt_base(tmp_path / "base")
    wide = make_model({**NATIVE, "d_model": 32})
    apply_lora(wide, LoraConfig(r=2))
    save_adapter(wide, tmp_path / "ad", LoraConfig(r=2))
    with pytest.raises(
        CheckpointError, match=r"Wqkv.lora_A.weight has shape \(2, 32\), this base needs \(2, 64\)"
    ):
        load_adapter(smalto.load(base), tmp_path / "ad")


def test_targets_matching_nothing() -> None:
    with pytest.raises(
        ConfigError,
        match=r"lora.targets = \['c_attn'\] matches no layer .* end in: Wqkv, down_proj, out_proj, up_proj",
    ):
        apply_lora(make_model(NATIVE), LoraConfig(targets=["c_attn"]))
    with pytest.raises(
        ConfigError, match=r"matches transformer.blocks.0.norm_1, which is not a linear layer"
    ):
        apply_lora(make_model(NATIVE), LoraConfig(targets=["norm_1"]))


def test_merge_writes_a_plain_folder(tmp_path: Path) -> None:
    """`smalto merge` (merge_adapter) writes a folder transformers loads without PEFT, with the adapter's logits;
    `--adapter` with a folder that is no adapter is refused by name."""
    from smalto.adapters.merge import merge_adapter
    from smalto.load import load_model_and_tokenizer

    base = mpt_base(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    ref = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=FOUR, init_lora_weights=False)
    )
    ref.save_pretrained(tmp_path / "ad")
    note = merge_adapter(base, tmp_path / "ad", tmp_path / "merged")
    assert note.startswith(
        f"wrote {tmp_path / 'merged'}: {base} with {tmp_path / 'ad'} merged into its weights"
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with pytest.raises(
        CheckpointError, match=r"adapter .*base is not a PEFT adapter folder \(no adapter_config.json\)"
    ):
        load_model_and_tokenizer(base, adapter=base)


def test_adapted_layers_compile_without_graph_breaks() -> None:
    """Per-block compile traces an adapted layer (under activation checkpointing) whole, with the same gradients;
    LLaMA-style row slices too."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = make_model(NATIVE).train()
    apply_lora(model, LoraConfig(r=2, targets=FOUR, dropout=0.1))
    randomize_b(model)
    layer = model.transformer.blocks[0].attn.Wqkv
    layer.lora["v"] = type(layer.lora["Wqkv"])(
        64, 64, r=2, scaling=0.5, dropout=0.0, name="v", rows=(128, 192)
    )
    x = torch.randn(2, 8, 64, requires_grad=True)
    torch.manual_seed(0)
    expected = layer(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    layer.zero_grad()
    compiled = torch.compile(checkpoint_wrapper(layer), backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for p, g in zip([p for p in layer.parameters() if p.requires_grad], grads, strict=True):
        torch.testing.assert_close(p.grad, g)
