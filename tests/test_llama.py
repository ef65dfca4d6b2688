"""LLaMA-family HF folders in and out: transformers' LlamaForCausalLM / MistralForCausalLM build and save a tiny
random model, `smalto.load` reads it, and the logits must match in float32; smalto's LLaMA-option models export
as native Llama folders; refusals name the field; a byte-fallback BPE tokenizer (LLaMA's converted layout, built
here) round-trips non-ASCII text through `smalto generate`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import smalto
from smalto.errors import ConfigError
from smalto.hf import save_pretrained
from tests import forkrun

ROOT = Path(__file__).resolve().parents[1]
V = 300  # 3 specials + 256 byte tokens + the trained pieces fit
BASE = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}


def hf_model(kind: str = "llama", **options) -> transformers.PreTrainedModel:
    """A random tiny LlamaForCausalLM / MistralForCausalLM; norms and biases random too, so each one counts."""
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **options}))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**{**BASE, **options}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_()
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


CASES = {
    "plain": ("llama", {}, 20, {}),
    "attention_bias": ("llama", {"attention_bias": True}, 20, {}),
    "mlp_bias": ("llama", {"mlp_bias": True}, 20, {}),
    "tied_head_dim_theta": (
        "llama",
        {"tie_word_embeddings": True, "head_dim": 24, "rope_theta": 5e5},
        20,
        {},
    ),
    "linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 20, {}),
    # past the pretrained 32 positions, where the base grows (smalto is loaded with the longer context)
    "dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 48, {"max_seq_len": 64}),
    "llama3": ("llama", {"rope_scaling": dict(LLAMA3)}, 20, {}),
    "yarn": (
        "llama",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
        20,
        {},
    ),
    "mistral_gelu_tanh": ("mistral", {"sliding_window": None, "hidden_act": "gelu_pytorch_tanh"}, 20, {}),
    "mistral_window": ("mistral", {"sliding_window": 6}, 20, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case, tmp_path):
    kind, options, T, load_kw = CASES[case]
    ref = hf_model(kind, **options)
    ref.save_pretrained(tmp_path)
    ours = smalto.load(tmp_path, **load_kw)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(ours, ids), logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_bin_shards_and_stale_rotary_buffers(tmp_path):
    """pytorch_model-*.bin shards with an index, q/k/v of one layer in different shards, and the rotary inv_freq
    buffers older transformers wrote (skipped: they are recomputed)."""
    ref = hf_model()
    state = ref.state_dict()
    names = list(state)
    half = names.index("model.layers.0.self_attn.k_proj.weight")  # q in shard 1, k and v in shard 2
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:half],
        "pytorch_model-00002-of-00002.bin": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        part = {k: state[k].clone() for k in keys}
        if file.startswith("pytorch_model-00001"):
            part["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(part, tmp_path / file)
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ref.config.save_pretrained(tmp_path)
    ids = torch.randint(0, V, (1, 12))
    torch.testing.assert_close(logits(smalto.load(tmp_path), ids), logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_transformers4_config_json(tmp_path):
    """The config.json layout of the hub's Llama 3.1 / Llama 2 folders (transformers 4: `rope_theta` and
    `rope_scaling` at the top, the legacy `type` key) reads as transformers 5 reads it."""
    ref = hf_model(rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=500000.0, rope_scaling={**LLAMA3, "type": "llama3"}, pretraining_tp=1)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = torch.randint(0, V, (1, 12))
    torch.testing.assert_close(logits(smalto.load(tmp_path), ids), logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_config_mapping(tmp_path):
    ref = hf_model(rope_scaling=dict(LLAMA3), attention_bias=True, head_dim=24)
    ref.save_pretrained(tmp_path)
    c = smalto.load(tmp_path).config
    a = c.attn_config
    assert (c.d_model, c.n_heads, c.kv_n_heads, c.head_dim, c.ffn_hidden_size) == (64, 4, 2, 24, 96)
    assert (c.norm_type, c.norm_eps, c.tie_word_embeddings, c.attn_bias, c.ffn_bias) == (
        "rmsnorm",
        1e-5,
        False,
        True,
        False,
    )
    assert a.rope and not a.alibi and a.rope_scaling == LLAMA3 and c.ffn_config.ffn_act_fn == {"name": "silu"}


# ---------------------------------------------------------------- out


@pytest.mark.parametrize(
    "kind,options",
    [
        ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 24, "rope_scaling": dict(LLAMA3)}),
        ("llama", {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
        ("mistral", {"sliding_window": 6}),
    ],
)
def test_export_round_trip_and_transformers_loads_it(kind, options, tmp_path):
    ours = smalto.load(_saved(hf_model(kind, **options), tmp_path / "src"))
    out = save_pretrained(ours, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    back = smalto.load(out)
    assert back.config == ours.config
    assert back.state_dict().keys() == ours.state_dict().keys()
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("MistralForCausalLM" if kind == "mistral" else "LlamaForCausalLM")
    ids = torch.randint(0, V, (2, 16))
    torch.testing.assert_close(logits(hf, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_smalto_built_llama_exports_natively(tmp_path):
    """A model smalto builds with the LLaMA options (not loaded from HF) is written as a Llama folder."""
    from tests.helpers import tiny_config

    cfg = tiny_config(
        no_bias=True,
        norm_type="rmsnorm",
        tie_word_embeddings=False,
        attn_config={"rope": True, "kv_n_heads": 2},
        ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": 96, "ffn_act_fn": {"name": "silu"}},
    )
    model = smalto.model.build_model(cfg).eval()
    out = save_pretrained(model, tmp_path / "out")
    raw = json.loads((out / "config.json").read_text())
    assert (raw["model_type"], raw["architectures"]) == ("llama", ["LlamaForCausalLM"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    # an MPT-options model stays an MPT folder
    mpt = save_pretrained(
        smalto.model.build_model(tiny_config(attn_config={"alibi": True})), tmp_path / "mpt"
    )
    assert json.loads((mpt / "config.json").read_text())["model_type"] in ("mpt", "smalto_mpt")


def test_kernel_plans_for_llama_configs(monkeypatch):
    """RoPE without ALiBi: training takes cuDNN's causal kernel (FlexAttention for a window narrower than the
    sequence), decode the Triton decode kernel; a window as wide as the sequence hides nothing."""
    from tests.kernels.test_backends import _select

    llama = {"attn_config": {"alibi": False, "rope": True, "kv_n_heads": 2}, "norm_type": "rmsnorm"}
    assert _select(monkeypatch, "auto", "train", **llama).kernel.name == "cudnn"
    assert _select(monkeypatch, "auto", "decode", **llama).kernel.name == "decode"
    for window, kernel in ((8, "flex"), (64, "cudnn")):  # _select trains at seq 64
        attn = {**llama["attn_config"], "sliding_window_size": window}
        assert _select(monkeypatch, "auto", "train", **{**llama, "attn_config": attn}).kernel.name == kernel


# ---------------------------------------------------------------- refusals


def _saved(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


REFUSALS = {
    "gpt_neox": ({"model_type": "gpt_neox"}, "model_type 'gpt_neox'"),
    "longrope": (
        {
            "rope_scaling": {
                "rope_type": "longrope",
                "factor": 2.0,
                "short_factor": [1.0],
                "long_factor": [1.0],
            }
        },
        "rope_type = 'longrope'",
    ),
    "moe": ({"model_type": "mistral", "num_local_experts": 8}, "num_local_experts = 8"),
    "partial_rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    "activation": ({"hidden_act": "gelu_new"}, "hidden_act = 'gelu_new'"),
}


def _llama_config_json(**changes) -> dict:
    return {
        **BASE,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        **changes,
    }


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_by_field_before_weights(case, tmp_path):
    changes, message = REFUSALS[case]
    (tmp_path / "config.json").write_text(json.dumps(_llama_config_json(**changes)))
    (tmp_path / "model.safetensors").write_bytes(b"not weights: reading them would fail differently")
    with pytest.raises(smalto.errors.UserError, match=re.escape(message)):
        smalto.load(tmp_path)


def test_cli_refuses_with_exit_2(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    byte_fallback_tokenizer(folder)
    changes, message = REFUSALS["longrope"]
    (folder / "config.json").write_text(json.dumps(_llama_config_json(**changes)))
    (folder / "model.safetensors").write_bytes(b"not weights")
    r = _smalto("generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "is not supported" in r.stderr and "Traceback" not in r.stderr


def test_rope_scaling_config_is_checked():
    from tests.helpers import tiny_config

    with pytest.raises(ConfigError, match=re.escape("rope_scaling.rope_type = 'ntk' is not allowed")):
        tiny_config(attn_config={"rope": True, "rope_scaling": {"rope_type": "ntk", "factor": 2.0}})
    with pytest.raises(ConfigError, match=re.escape("rope_scaling.low_freq_factor = None must be a number")):
        tiny_config(attn_config={"rope": True, "rope_scaling": {"rope_type": "llama3", "factor": 2.0}})


# ---------------------------------------------------------------- tokenizer and generation


def byte_fallback_tokenizer(folder: Path):
    """LLaMA's converted-tokenizer layout at a tiny size: BPE with byte fallback (<0x00>..<0xFF>), ▁ for spaces
    (Metaspace, prepended to the first word), <s> prepended; decoder ▁ → space, bytes fused, first space stripped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = meta
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there"] * 10
    trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=V - 259, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert len(vocab) <= V
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    fast.save_pretrained(str(folder))
    return fast


def test_byte_fallback_tokenizer_round_trips_non_ascii(tmp_path):
    from smalto.tokenizer import apply_chat_template, load_tokenizer

    byte_fallback_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "hello wörld — 日本 🙂 the fox"
    ids = tok.encode(text)
    assert tok.convert_ids_to_tokens(tok.encode("日")) == ["<s>", "▁", "<0xE6>", "<0x97>", "<0xA5>"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text
    prompt = apply_chat_template(tok, [{"role": "user", "content": "héllo"}])
    assert prompt == "[INST] héllo [/INST]"


def test_generate_matches_transformers_greedy(tmp_path):
    """smalto's static-cache decode (RoPE at the step's position, GQA, llama3 scaling) picks the same greedy
    tokens as transformers' generate, and the text keeps the space SentencePiece puts before a word."""
    from smalto.generate import generate
    from smalto.tokenizer import load_tokenizer

    ref = hf_model(rope_scaling=dict(LLAMA3))
    folder = _saved(ref, tmp_path / "m")
    byte_fallback_tokenizer(folder)
    tok = load_tokenizer(folder)
    prompt = "hello wörld"
    ids = torch.tensor([tok.encode(prompt)])
    want = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, ids.shape[1] :
    ]
    ours = smalto.load(folder)
    (out,) = generate(ours, tok, [prompt], max_new_tokens=12, temperature=0.0, eos_token_id=[])
    assert out.token_ids == want.tolist()
    full = tok.decode(ids[0].tolist() + out.token_ids, skip_special_tokens=True)
    assert prompt + out.text == full


def test_cli_convert_then_generate_non_ascii(tmp_path):
    """`smalto convert` writes a native Llama folder with the tokenizer; `smalto generate` on it prints
    transformers' greedy completion of a non-ASCII prompt."""
    ref = hf_model()
    folder = _saved(ref, tmp_path / "m")
    byte_fallback_tokenizer(folder)
    c = _smalto("convert", str(folder), str(tmp_path / "out"))
    assert c.returncode == 0, c.stderr
    assert c.stdout.decode().endswith("transformers loads it natively (LlamaForCausalLM)\n")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    r = _smalto(
        "generate", str(tmp_path / "out"), "--prompt", "日本 hello", "--max-new-tokens", "6", "--temperature", "0",
        "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    from smalto.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    ids = torch.tensor([tok.encode("日本 hello")])
    new = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)[
        0, ids.shape[1] :
    ]
    full = tok.decode(ids[0].tolist() + [t for t in new.tolist() if t != 2], skip_special_tokens=True)
    assert r.stdout.decode() == full.removeprefix("日本 hello") + "\n"


def _smalto(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; stdout as bytes (a random model's text may hold a carriage return), stderr text."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = forkrun.run([sys.executable, "-m", "smalto", *args], capture_output=True, env=env, timeout=600)
    r.stderr = r.stderr.decode()
    return r


def test_eval_loads_llama_folders_as_smalto_models(tmp_path):
    """`smalto eval` scores a LLaMA folder with smalto's model (its kernels, `--quantize`), not transformers'."""
    from smalto.eval.models import load_model
    from smalto.model.mpt import MPTForCausalLM

    ref = hf_model(attention_bias=True)
    folder = _saved(ref, tmp_path / "m")
    byte_fallback_tokenizer(folder)
    model, tok = load_model(str(folder), device="cpu", dtype="fp32")
    assert isinstance(model, MPTForCausalLM) and not model.training
    ids = torch.tensor([tok.encode("hello there fox")])
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_a_minimal_mistral_config_takes_mistralconfigs_defaults():
    """A hand-written Mistral config.json without `sliding_window` or `num_key_value_heads` means what
    transformers' MistralConfig makes of it: a 4096-token window and 8 key/value heads; null: no window."""
    from smalto.hf.llama import config_from_llama

    raw = {"model_type": "mistral", "vocab_size": V, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 16}  # fmt: skip
    ref = transformers.MistralConfig(**raw)
    a = config_from_llama(raw, "config.json").attn_config
    assert (a.sliding_window_size, a.kv_n_heads) == (ref.sliding_window, ref.num_key_value_heads) == (4096, 8)
    a = config_from_llama(
        {**raw, "sliding_window": None, "num_key_value_heads": 4}, "config.json"
    ).attn_config
    assert (a.sliding_window_size, a.kv_n_heads) == (-1, 4)
