"""Generation: cached decode vs full forward, batching, transformers parity, sampling filters, stops, limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import smalto
from smalto.chat import ChatSession
from smalto.errors import UserError
from smalto.generate import generate, iter_generate
from smalto.hf import save_pretrained
from smalto.model.cache import KVCache
from smalto.model.mpt import MPTForCausalLM
from smalto.sampling import SamplingParams, filter_logits, sample
from smalto.tokenizer import load_tokenizer
from tests.helpers import tiny_config

# overrides of tests.helpers.tiny_config (64 wide, 4 heads, 2 layers, vocab 256)
ALIBI = dict(max_seq_len=48, no_bias=True, attn_config={"alibi": True})
ROPE_GQA = dict(
    max_seq_len=48,
    attn_config={"rope": True, "kv_n_heads": 2, "qk_ln": True},
    ffn_config={"ffn_type": "mptglu"},
)
LEARNED_POS = dict(max_seq_len=48, learned_pos_emb=True)


def make_model(spec: dict, peaky: bool = True, **overrides) -> MPTForCausalLM:
    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_config(**{**spec, **overrides})).eval()
    if peaky:  # larger weights make the logits peaky, so greedy near-ties cannot flip a comparison
        with torch.no_grad():
            model.transformer.wte.weight.mul_(8)
    return model


PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [200, 1], [9, 9, 9, 30]]


@torch.no_grad()
@pytest.mark.parametrize("spec", [ALIBI, ROPE_GQA, LEARNED_POS], ids=["alibi", "rope_gqa", "learned_pos"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_decode_equals_full_forward(spec: dict, impl: str) -> None:
    model = make_model(
        spec,
        peaky=False,
        attn_config={**spec["attn_config"], "attn_impl": impl}
        if "attn_config" in spec
        else {"attn_impl": impl},
    )
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(x).logits
    cache = KVCache.for_model(model.config, 2, 24, model.dtype, model.device)
    prefill = model(x[:, :12], past_key_values=cache).logits
    steps = [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("spec", [ALIBI, ROPE_GQA, LEARNED_POS], ids=["alibi", "rope_gqa", "learned_pos"])
def test_batched_left_padded_equals_one_at_a_time(spec: dict) -> None:
    model = make_model(spec)
    batched = generate(model, None, PROMPTS, max_new_tokens=12, temperature=0)
    for prompt, out in zip(PROMPTS, batched, strict=True):
        (alone,) = generate(model, None, [prompt], max_new_tokens=12, temperature=0)
        assert out.token_ids == alone.token_ids
        assert out.prompt_tokens == len(prompt) and out.finish_reason == "length"
    # and each row's greedy continuation is the argmax of an uncached forward over prompt + continuation
    for prompt, out in zip(PROMPTS, batched, strict=True):
        seq = torch.tensor([prompt + out.token_ids])
        logits = model(seq).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == out.token_ids


@torch.no_grad()
def test_greedy_equals_transformers_greedy(tmp_path: Path) -> None:
    model = make_model(ALIBI)
    save_pretrained(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # native MptForCausalLM
    assert type(hf).__name__ == "MptForCausalLM"
    for prompt in PROMPTS:
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        (ours,) = generate(smalto.load(tmp_path / "m"), None, [prompt], max_new_tokens=15, temperature=0)
        assert ours.token_ids == ref


@torch.no_grad()
def test_generation_config_eos_ids_stop_as_in_transformers(tmp_path: Path) -> None:
    """A folder's generation_config.json `eos_token_id` list (LLaMA-3's end of text and end of turn) is where
    generation stops, as transformers' generate stops; the server's engine too, and a saved copy keeps it."""
    from smalto.serve.engine import Engine, Output, Request

    save_pretrained(make_model(ALIBI, peaky=False), tmp_path / "m")  # peaky weights repeat one token
    prompt = PROMPTS[0]
    free = generate(smalto.load(tmp_path / "m"), None, [prompt], max_new_tokens=12, temperature=0)[
        0
    ].token_ids
    stop = next(t for t in free[2:] if t not in free[:2])  # a token greedy decoding reaches after two others
    cut = free.index(stop)
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [250, stop]}))
    model = smalto.load(tmp_path / "m")
    assert model.eos_token_ids == (250, stop)
    (ours,) = generate(model, None, [prompt], max_new_tokens=12, temperature=0)
    assert ours.token_ids == free[:cut] and ours.finish_reason == "eos"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # reads the same generation_config
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
        0, len(prompt) :
    ]
    assert ref.tolist() == [
        *free[:cut],
        stop,
    ]  # transformers keeps the EOS it stopped at; smalto leaves it out
    outs: list[Output] = []
    engine = Engine(model, None, max_batch=2)
    engine.submit(
        Request(prompt=prompt, emit=outs.append, params=SamplingParams(temperature=0), max_tokens=12)
    )
    while not (outs and outs[-1].finish_reason):
        engine.step()
    assert [t for o in outs for t in o.token_ids] == free[:cut] and outs[-1].finish_reason == "stop"
    save_pretrained(model, tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "generation_config.json").read_text())["eos_token_id"] == [
        250,
        stop,
    ]


def test_filters_match_transformers_logits_processors() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=g) * 3
    history = torch.randint(0, 64, (4, 10), generator=g)
    seen = torch.zeros(4, 64, dtype=torch.bool).scatter(1, history, True)
    cases = [
        dict(temperature=0.7, repetition_penalty=1.3),
        dict(temperature=1.0, top_k=7),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.2, min_p=0.1),
        dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.5),
    ]
    for case in cases:
        p = SamplingParams(**case)
        ref = logits.clone()
        if p.repetition_penalty != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(history, ref)
        ref = TemperatureLogitsWarper(p.temperature)(history, ref)
        if p.top_k:
            ref = TopKLogitsWarper(p.top_k)(history, ref)
        if p.top_p:
            ref = TopPLogitsWarper(p.top_p)(history, ref)
        if p.min_p:
            ref = MinPLogitsWarper(p.min_p)(history, ref)
        ours = filter_logits(logits.clone(), p, seen)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), case
        torch.testing.assert_close(
            ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], msg=lambda m, case=case: f"{case}: {m}"
        )


def test_sampler_draws_from_the_softmax_and_is_seeded() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(20000, 5).contiguous()
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, SamplingParams(temperature=1.0), generator=g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    assert torch.equal(draws, sample(logits, SamplingParams(), generator=torch.Generator().manual_seed(0)))
    model = make_model(ALIBI)
    a = generate(model, None, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    b = generate(model, None, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=50, seed=3)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    greedy = generate(model, None, PROMPTS, max_new_tokens=8, temperature=0)
    top1 = generate(model, None, PROMPTS, max_new_tokens=8, temperature=0.8, top_k=1, seed=5)
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]


@pytest.fixture(scope="module")
def neox(neox_tokenizer_dir: Path):
    return load_tokenizer(neox_tokenizer_dir)


def test_stop_strings_eos_and_streaming(neox) -> None:
    model = make_model(ALIBI, vocab_size=50432, max_seq_len=64)
    prompts = ["Hello world, this is", "The quick brown fox"]
    (free, _other) = generate(model, neox, prompts, max_new_tokens=16, temperature=0)
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    # a stop string taken from the middle of the free-running text ends that row just before it
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    deltas = []
    outs = generate(
        model, neox, prompts, max_new_tokens=16, temperature=0, stop=[stop], callback=deltas.append
    )
    first = free.text.find(stop)
    assert outs[0].finish_reason == "stop" and outs[0].text == free.text[:first]
    for row, out in enumerate(outs):  # streamed pieces add up to the final text, and each row ends once
        assert "".join(d.text for d in deltas if d.row == row) == out.text
        assert [d.finish_reason for d in deltas if d.row == row and d.finish_reason] == [out.finish_reason]
        assert stop not in "".join(d.text for d in deltas if d.row == row)
    # EOS: the third greedy token ends the row, and is not part of the output
    eos = free.token_ids[2]
    (out, _) = generate(model, neox, prompts, max_new_tokens=16, temperature=0, eos_token_id=eos)
    assert out.finish_reason == "eos" and out.token_ids == free.token_ids[: free.token_ids.index(eos)]
    (out, _) = generate(model, neox, prompts, max_new_tokens=16, temperature=0, eos_token_id=[])  # no EOS
    assert out.token_ids == free.token_ids
    assert [d for d in iter_generate(model, neox, "Hi", max_new_tokens=3, temperature=0)][-1].finish_reason


def test_past_max_seq_len_refused_then_allowed_when_raised(tmp_path: Path) -> None:
    model = make_model(ALIBI, max_seq_len=16)
    prompt = list(range(1, 11))
    with pytest.raises(UserError, match=r"exceeds max_seq_len \(16\).*larger max_seq_len"):
        generate(model, None, [prompt], max_new_tokens=10, temperature=0)
    save_pretrained(model, tmp_path / "m")
    longer = smalto.load(tmp_path / "m", max_seq_len=64)
    (out,) = generate(longer, None, [prompt], max_new_tokens=30, temperature=0)
    assert len(out.token_ids) == 30  # 40 tokens in a model trained for 16
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        assert longer(seq).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == out.token_ids
    learned = make_model(LEARNED_POS, max_seq_len=16)
    with pytest.raises(UserError, match="learned positions"):
        generate(learned, None, [prompt], max_new_tokens=10, temperature=0)


def test_bad_requests_refused() -> None:
    model = make_model(ALIBI)
    with pytest.raises(UserError, match="need a tokenizer"):
        generate(model, None, ["text"], max_new_tokens=2)
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, None, [[1]], max_new_tokens=0)
    with pytest.raises(UserError, match="top_p"):
        generate(model, None, [[1]], max_new_tokens=2, top_p=1.5)
    with pytest.raises(UserError, match="temperature"):
        generate(model, None, [[1]], max_new_tokens=2, temperature=-1)


def test_chat_session_adds_no_bos_to_a_template_that_writes_one(tmp_path, monkeypatch) -> None:
    """A LLaMA chat template writes its BOS: the prompt the model reads is the rendering's ids, as transformers'
    apply_chat_template(tokenize=True) gives them, with one BOS (not one more from the tokenizer)."""
    import smalto.chat
    from tests.test_llama import V, byte_fallback_tokenizer

    tok = byte_fallback_tokenizer(tmp_path)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # LLaMA-2's templates begin so
    seen: list[list[int]] = []
    real = smalto.chat.generate
    monkeypatch.setattr(
        smalto.chat,
        "generate",
        lambda m, t, prompts, **kw: seen.append(prompts[0]) or real(m, t, prompts, **kw),
    )
    chat = ChatSession(make_model(ALIBI, vocab_size=V, max_seq_len=128), tok, max_new_tokens=4, temperature=0)
    chat.send("hello there")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert seen == [tok(text, add_special_tokens=False)["input_ids"]]
    assert seen[0].count(tok.bos_token_id) == 1


def test_chat_session_uses_chatml_and_keeps_history(neox) -> None:
    model = make_model(ALIBI, vocab_size=50432, max_seq_len=256)
    chat = ChatSession(model, neox, system="Be brief.", max_new_tokens=6, temperature=0)
    first = chat.send("Hi there")
    assert chat.messages[-1] == {"role": "assistant", "content": first}
    prompt = chat._prompt()
    assert prompt.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" in chat.stop
    chat.send("And again")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
