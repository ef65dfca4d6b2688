"""HF folders in and out: round trips against transformers' native MptForCausalLM and the remote code."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

import smalto
from smalto.errors import CheckpointError, ConfigError
from smalto.hf import native_incompatibilities, save_pretrained
from smalto.model.mpt import MPTForCausalLM
from tests import forkrun
from tests.helpers import tiny_config
from tests.model.helpers import MPT_7B_CONFIG_JSON

# overrides of tests.helpers.tiny_config (64 wide, 4 heads, 2 layers, vocab 256, 32 positions)
NATIVE = dict(
    no_bias=True,
    norm_type="low_precision_layernorm",
    attn_config={"alibi": True, "clip_qkv": 6.0},
)
# everything transformers' native class cannot compute, in one model
EXOTIC = dict(
    no_bias=False,
    norm_type="rmsnorm",
    tie_word_embeddings=False,
    logit_scale=0.5,
    expansion_ratio=2.5,
    attn_config={
        "rope": True,
        "kv_n_heads": 2,
        "qk_ln": True,
        "clip_qkv": 4.0,
        "sliding_window_size": 5,
        "softmax_scale": 0.3,
    },
    ffn_config={"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}},
)
VARIANTS = {
    "exotic": EXOTIC,
    "learned_pos_qk_gn": dict(
        learned_pos_emb=True,
        attn_config={"qk_gn": True},
        norm_type="layernorm",
        logit_scale="inv_sqrt_d_model",
    ),
    "mqa_alibi_bias4": dict(
        no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 4, "kv_n_heads": 1},
    ),
}


def make_model(spec: dict, seed: int = 0) -> MPTForCausalLM:
    torch.manual_seed(seed)
    model = MPTForCausalLM(tiny_config(**spec)).eval()
    with torch.no_grad():  # random norm weights/biases so a swapped or ignored tensor shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(batch: int = 2, T: int = 12, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_native_roundtrip_matches_transformers(tmp_path: Path) -> None:
    model = make_model(NATIVE)
    assert native_incompatibilities(model.config) == []
    save_pretrained(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (
        cfg["model_type"] == "mpt"
        and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mpt.MPTForCausalLM"
    )
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(native).__name__ == "MptForCausalLM"
    x = ids()
    torch.testing.assert_close(native(x).logits, model(x).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(smalto.load(tmp_path / "m")(x).logits, model(x).logits, atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("safe", [True, False])
def test_transformers_save_loads_in_smalto(tmp_path: Path, safe: bool) -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.MptConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        vocab_size=256,
        max_seq_len=32,
        attn_config={"attn_impl": "torch", "clip_qkv": 5.0},
    )
    ref = transformers.MptForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    model = smalto.load(tmp_path / "hf")
    x = ids()
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hub_layout_bin_shards_legacy_keys(tmp_path: Path) -> None:
    """The layout of mosaicml/mpt-7b: .bin shards + index, attn_impl torch, prefix_lm, attn_type, verbose keys."""
    model = make_model(NATIVE)
    folder = tmp_path / "mpt-7b-like"
    folder.mkdir()
    config = {  # the hub's mpt-7b config.json, at the tiny shape of NATIVE
        **MPT_7B_CONFIG_JSON,
        "attn_config": {**MPT_7B_CONFIG_JSON["attn_config"], "clip_qkv": 6.0},
        "d_model": 64,
        "max_seq_len": 32,
        "n_heads": 4,
        "n_layers": 2,
        "torch_dtype": "float32",
        "vocab_size": 256,
    }
    (folder / "config.json").write_text(json.dumps(config))
    state = model.state_dict()
    names = list(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, folder / file)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    loaded = smalto.load(folder)
    assert loaded.config.attn_config.attn_impl == "auto" and loaded.config.attn_config.alibi
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=0)
    native = transformers.AutoModelForCausalLM.from_pretrained(
        folder
    )  # transformers reads the same folder natively
    torch.testing.assert_close(native(x).logits, loaded(x).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_composer_prefix_and_tied_lm_head(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = make_model(NATIVE)
    save_pretrained(model, tmp_path / "m")
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["model.lm_head.weight"] = model.transformer.wte.weight.clone()  # transformers writes the tied head
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    x = ids()
    torch.testing.assert_close(smalto.load(tmp_path / "m")(x).logits, model(x).logits, atol=0, rtol=0)
    state["model.lm_head.weight"] = state["model.lm_head.weight"] + 1
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs"):
        smalto.load(tmp_path / "m")


@torch.no_grad()
@pytest.mark.parametrize("safe", [True, False])
def test_sharded_save_dtype_and_overrides(tmp_path: Path, safe: bool) -> None:
    model = make_model(EXOTIC)
    save_pretrained(model, tmp_path / "m", shard_size="20KB", dtype="bf16", safe_serialization=safe)
    ext = "safetensors" if safe else "bin"
    stem = "model" if safe else "pytorch_model"
    index = json.loads((tmp_path / "m" / f"{stem}.{ext}.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "m" / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = smalto.load(tmp_path / "m", attn_impl="torch", max_seq_len=64)
    assert loaded.dtype == torch.bfloat16 and loaded.config.max_seq_len == 64
    assert loaded.config.attn_config.attn_impl == "auto"
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.to(torch.bfloat16)), name
    assert smalto.load(tmp_path / "m", dtype="fp32").dtype == torch.float32


def test_resave_replaces_weights_keeps_other_files(tmp_path: Path) -> None:
    model = make_model(NATIVE)
    save_pretrained(model, tmp_path / "m", shard_size="20KB")
    (tmp_path / "m" / "README.md").write_text("my notes")
    save_pretrained(model, tmp_path / "m")
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "README.md" in names and "model.safetensors" in names
    assert not any(n.startswith("model-0") or n.endswith("index.json") for n in names)
    assert not any(p.name.startswith(".m.") for p in tmp_path.iterdir())  # no temp folder left behind


def _break(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_config", "no config.json"),
        ("not_mpt", "model_type 'gpt2'"),
        ("bad_key", "config.json: model.attn_config.alibi = 'yes' has the wrong type; expected bool"),
        ("unsupported_key", "config.json: final_logit_softcapping = 30.0 is not supported"),
        ("no_weights", "holds no weights"),
        ("missing", "missing 1 tensor"),
        ("shape", "wrong shape"),
        ("unexpected", "unexpected 1 tensor"),
        ("missing_shard", "missing: model-00002"),
    ],
)
def test_bad_folders_refused(tmp_path: Path, case: str, message: str) -> None:
    model = make_model(NATIVE)
    folder = save_pretrained(model, tmp_path / "m")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "no_config":
        cfg_path.unlink()
    elif case == "not_mpt":
        cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    elif case == "bad_key":
        cfg_path.write_text(json.dumps({**cfg, "attn_config": {**cfg["attn_config"], "alibi": "yes"}}))
    elif case == "unsupported_key":  # an unknown key that changes the model; a harmless one only warns
        cfg_path.write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    elif case == "no_weights":
        (folder / "model.safetensors").unlink()
    elif case == "missing":
        _break(folder, lambda s: s.pop("transformer.blocks.1.attn.Wqkv.weight"))
    elif case == "shape":
        _break(folder, lambda s: s.update({"transformer.norm_f.weight": torch.ones(3)}))
    elif case == "unexpected":
        _break(folder, lambda s: s.update({"transformer.blocks.9.ffn.up_proj.weight": torch.ones(3)}))
    elif case == "missing_shard":
        save_pretrained(model, folder, shard_size="20KB")
        (folder / f"model-00002-of-{len(list(folder.glob('model-*'))):05d}.safetensors").unlink()
    with pytest.raises((CheckpointError, ConfigError), match=message):
        smalto.load(folder)


def test_native_incompatibilities_named() -> None:
    why = native_incompatibilities(tiny_config(**EXOTIC))
    for word in (
        "alibi is off",
        "rope",
        "qk_ln",
        "kv_n_heads",
        "sliding_window",
        "mptglu",
        "ffn_hidden_size",
        "rmsnorm",
        "biases",
        "untied",
        "logit_scale",
    ):
        assert any(word in w for w in why), word


# ---------------------------------------------------------------- remote code, in a process without smalto

NO_SMALTO = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "smalto" or name.startswith("smalto."):
            raise ImportError("smalto must not be importable here")
sys.meta_path.insert(0, _Block())
import os
os.environ["HF_HUB_OFFLINE"] = "1"
"""


def run_without_smalto(script: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    # SMALTO_REMOTE_PYTHON: another interpreter (e.g. a venv with transformers 4.40) to check the remote code with
    python = os.environ.get("SMALTO_REMOTE_PYTHON", sys.executable)
    proc = forkrun.run(
        [python, "-I", "-c", NO_SMALTO + textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@torch.no_grad()
def test_remote_code_matches_smalto_for_every_variant(tmp_path: Path) -> None:
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # a left-padded row
    for name, spec in VARIANTS.items():
        model = make_model(spec)
        save_pretrained(model, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["model_type"] == ("mpt" if not native_incompatibilities(model.config) else "smalto_mpt")
        torch.save(
            {"x": x, "mask": mask, "logits": model(x).logits, "masked": model(x, attention_mask=mask).logits},
            tmp_path / f"{name}.pt",
        )
        # eager reference for the padded rows: a padded row's real tokens must match that row run alone
        torch.save(model(x[1:, 3:]).logits, tmp_path / f"{name}_row1.pt")
    out = run_without_smalto(
        f"""
        import torch, transformers
        for name in {list(VARIANTS)!r}:
            ref = torch.load(name + ".pt")
            for impl in ("torch", "triton"):
                cfg = transformers.AutoConfig.from_pretrained(name, trust_remote_code=True)
                cfg.attn_config["attn_impl"] = impl
                m = transformers.AutoModelForCausalLM.from_pretrained(name, config=cfg, trust_remote_code=True)
                with torch.no_grad():
                    torch.testing.assert_close(m(ref["x"]).logits, ref["logits"], atol=1e-5, rtol=0)
                    out = m(ref["x"], attention_mask=ref["mask"]).logits
                    torch.testing.assert_close(out[1:, 3:], torch.load(name + "_row1.pt"), atol=1e-5, rtol=0)
            try:  # a folder native transformers cannot compute must not load natively
                transformers.AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False)
                native = "loaded"
            except (ValueError, KeyError) as e:  # unknown model type: only its remote code can build it
                if "smalto_mpt" not in str(e) and "trust_remote_code" not in str(e):
                    raise
                native = "refused"
            print(name, cfg.model_type, native)
        """,
        tmp_path,
    )
    for name in VARIANTS:
        assert f"{name} smalto_mpt refused" in out, out


def test_published_usage_snippet_runs(tmp_path: Path, neox_tokenizer_dir: Path) -> None:
    """The snippet from the MPT model cards, with init_device cpu, on a tiny model saved by smalto."""
    spec = {**NATIVE, "vocab_size": 50432, "max_seq_len": 16}
    model = make_model(spec)
    save_pretrained(model, tmp_path / "model", tokenizer=neox_tokenizer_dir)
    prompt = "Here is a recipe for vegan banana bread:\n"
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(
            torch.tensor([[int(t) for t in _encode(neox_tokenizer_dir, prompt)]])
        ).logits
    torch.save(ref.float(), tmp_path / "ref.pt")
    out = run_without_smalto(
        """
        import torch, transformers
        path, name = "model", "model"
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
        config.attn_config['attn_impl'] = 'triton'
        config.init_device = 'cpu'
        config.max_seq_len = 64  # ALiBi: longer than trained (16)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, torch_dtype=torch.bfloat16,
                                                                  trust_remote_code=True)
        assert model.dtype == torch.bfloat16
        prompt = 'Here is a recipe for vegan banana bread:\\n'
        ids = tokenizer(prompt, return_tensors='pt').input_ids
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits.float(), torch.load('ref.pt'), atol=0.1, rtol=0.05)
        pipe = transformers.pipeline('text-generation', model=model, tokenizer=tokenizer, device='cpu')
        with torch.autocast('cpu', dtype=torch.bfloat16):
            text = pipe(prompt, max_new_tokens=30, do_sample=True, use_cache=True)[0]['generated_text']
        assert text.startswith(prompt) and len(tokenizer(text).input_ids) > len(ids[0]) + 16
        out = model.generate(ids, max_new_tokens=30, do_sample=False)  # past the trained max_seq_len of 16
        print("generated", out.shape[1])
        """,
        tmp_path,
    )
    assert "generated" in out


def _encode(folder: Path, text: str) -> list[int]:
    from smalto.tokenizer import load_tokenizer

    return load_tokenizer(folder).encode(text)


def test_remote_code_takes_every_attn_impl_smalto_writes() -> None:
    """A saved folder keeps its attn_impl: the remote code must run each one smalto accepts (and the hub's)."""
    from smalto.hf_remote.modeling_mpt import KERNELS
    from smalto.model.config import ATTN_IMPLS, LEGACY_ATTN_IMPLS

    assert set(ATTN_IMPLS) | set(LEGACY_ATTN_IMPLS) <= set(KERNELS), set(ATTN_IMPLS) - set(KERNELS)
