"""The continuous-batching engine: the same greedy tokens as `smalto generate` for each request, whatever else is in
the batch (mixed lengths, arrivals mid-flight, chunked prefill), for ALiBi, RoPE+GQA, learned positions and a
sliding window; slots freed by cancels; the bounded queue."""

from __future__ import annotations

import itertools

import pytest
import torch

from smalto.generate import generate
from smalto.model.mpt import MPTForCausalLM
from smalto.sampling import SamplingParams
from smalto.serve.engine import Engine, Output, QueueFull, Request
from tests.helpers import tiny_config

SPECS = {
    "alibi": dict(no_bias=True, attn_config={"alibi": True}),
    "rope_gqa": dict(
        attn_config={"rope": True, "kv_n_heads": 2, "qk_ln": True}, ffn_config={"ffn_type": "mptglu"}
    ),
    "learned_pos": dict(learned_pos_emb=True),
    "window": dict(attn_config={"rope": True, "sliding_window_size": 6}),  # Mistral's sliding window
}
# token-id prompts of mixed lengths (vocab 256, no tokenizer: ids in, ids out)
PROMPTS = [
    [5, 17, 99, 3, 42, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [200, 1],
    [9, 9, 9, 30],
    [77] * 9,
    [3, 1, 4, 1, 5],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36],
]
MAX_NEW = [12, 20, 5, 16, 9, 16]


def make_model(spec: str) -> MPTForCausalLM:
    torch.manual_seed(0)
    return MPTForCausalLM(tiny_config(max_seq_len=48, **SPECS[spec])).eval()


def run(engine: Engine, arrivals: dict[int, list[int]], steps: int = 200) -> list[list[Output]]:
    """Submit prompt i at engine step arrivals[step]; step until every request has finished."""
    outs: list[list[Output]] = [[] for _ in PROMPTS]
    for step in range(steps):
        for i in arrivals.get(step, []):
            engine.submit(
                Request(
                    prompt=PROMPTS[i],
                    emit=outs[i].append,
                    params=SamplingParams(temperature=0),
                    max_tokens=MAX_NEW[i],
                )
            )
        engine.step()
        if all(o and o[-1].finish_reason for o in outs):
            return outs
    raise AssertionError("requests did not finish")


FEED = pytest.mark.parametrize("feed", [False, True], ids=["firsts-from-host", "firsts-on-device"])


@FEED
@pytest.mark.parametrize("spec", list(SPECS))
def test_greedy_equals_generate_whatever_the_batch(spec: str, feed: bool) -> None:
    # three requests at once for two slots (one waits), three more arriving mid-flight; prompts are prefilled
    # 4 tokens a step, so a long prompt is written over several steps while the others decode. The decode step
    # reads 16, 32 or 48 positions (the bucket of the longest running sequence): sequences cross 16 and 32
    # mid-flight, and the bucket falls again when the longest ones end
    max_batch, chunk, arrivals = 2, 4, {0: [0, 1, 2], 3: [3], 7: [4], 9: [5]}
    model = make_model(spec)
    want = [
        generate(model, None, [p], max_new_tokens=n, temperature=0, eos_token_id=[])[0].token_ids
        for p, n in zip(PROMPTS, MAX_NEW, strict=True)
    ]
    assert len({tuple(w) for w in want}) == len(want)  # the outputs differ: a mix-up between rows would show
    engine = Engine(model, None, max_batch=max_batch, prefill_chunk=chunk, min_bucket=16)
    engine.feed_firsts = feed  # CUDA's way (first tokens fed to the decode step on the device) or the CPU's
    assert engine.dec.buckets == [16, 32, 48]
    used = []
    step = engine.dec.step
    engine.dec.step = lambda tokens, pos, n_keys: used.append(n_keys) or step(tokens, pos, n_keys)  # type: ignore[method-assign]
    outs = run(engine, arrivals)
    got = [[t for o in out for t in o.token_ids] for out in outs]
    assert got == want
    changes = [(a, b) for a, b in itertools.pairwise(used) if a != b]
    assert {(16, 32), (32, 16), (32, 48)} <= set(changes), used
    assert [out[-1].finish_reason for out in outs] == ["length"] * len(PROMPTS)
    assert engine.busy() == 0


@FEED
@pytest.mark.parametrize("spec", list(SPECS))
def test_prompts_prefilled_together_decode_as_alone(spec: str, feed: bool) -> None:
    # four requests at once fill the four slots: their prompts go in one packed forward; the other two, arriving
    # one at a time, alone
    model = make_model(spec)
    want = [
        generate(model, None, [p], max_new_tokens=n, temperature=0, eos_token_id=[])[0].token_ids
        for p, n in zip(PROMPTS, MAX_NEW, strict=True)
    ]
    engine = Engine(model, None, max_batch=4, prefill_chunk=64, min_bucket=16)
    engine.feed_firsts = feed
    packed: list[int] = []
    prefill_packed = engine.dec.prefill_packed
    engine.dec.prefill_packed = lambda parts: packed.append(len(parts)) or prefill_packed(parts)  # type: ignore[method-assign]
    outs = run(engine, {0: [0, 1, 2, 3, 4, 5]})
    assert [[t for o in out for t in o.token_ids] for out in outs] == want
    assert packed[0] == 4


@FEED
def test_seeded_sampling_equals_generate(feed: bool) -> None:
    model = make_model("alibi")
    params = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)
    want = generate(model, None, [PROMPTS[0]], max_new_tokens=15, seed=7, eos_token_id=[], **params)[0]
    engine = Engine(model, None, max_batch=3)
    engine.feed_firsts = feed
    outs: list[Output] = []
    engine.submit(
        Request(prompt=PROMPTS[1], emit=lambda o: None, params=SamplingParams(temperature=1.0), max_tokens=30)
    )
    engine.step()
    engine.submit(
        Request(prompt=PROMPTS[0], emit=outs.append, params=SamplingParams(**params), max_tokens=15, seed=7)
    )
    while not (outs and outs[-1].finish_reason):
        engine.step()
    assert [t for o in outs for t in o.token_ids] == want.token_ids


def test_cancel_frees_the_slot_at_the_next_step_and_the_queue_is_bounded() -> None:
    engine = Engine(make_model("alibi"), None, max_batch=1, max_queue=1)
    got: list[Output] = []
    first = Request(prompt=[1, 2, 3], emit=got.append, max_tokens=40)
    engine.submit(first)
    engine.step()
    assert engine.slots[0] is not None and engine.slots[0].req is first
    engine.submit(Request(prompt=[4, 5], emit=lambda o: None, max_tokens=3))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt=[6], emit=lambda o: None, max_tokens=3))
    first.cancel()
    n = len(got)
    engine.step()
    assert engine.slots[0] is not None and engine.slots[0].req is not first  # the waiting one took the slot
    assert len(got) == n  # nothing more for the cancelled request


@FEED
def test_a_stop_token_ends_the_sequence_and_its_slot_serves_the_next(feed: bool) -> None:
    # the step after a sequence's stop token is already queued when the host sees that token: its extra token
    # is dropped, and the next request in that slot decodes as if alone
    model = make_model("alibi")

    def alone(prompt: list[int], n: int) -> list[int]:
        return generate(model, None, [prompt], max_new_tokens=n, temperature=0, eos_token_id=[])[0].token_ids

    first, second = alone(PROMPTS[4], 12), alone(PROMPTS[2], 20)
    stop = next(t for t in first if t != first[0])
    cut = first.index(stop)
    assert cut >= 2
    engine = Engine(model, None, max_batch=1)
    engine.feed_firsts = feed
    outs: list[list[Output]] = [[], []]
    greedy = SamplingParams(temperature=0)
    engine.submit(Request(PROMPTS[4], outs[0].append, greedy, max_tokens=12, stop_token_ids={stop}))
    engine.submit(Request(PROMPTS[2], outs[1].append, greedy, max_tokens=20))
    for _ in range(60):
        engine.step()
    assert [t for o in outs[0] for t in o.token_ids] == first[:cut]
    assert [o.finish_reason for o in outs[0]] == [None] * cut + ["stop"]  # nothing after the stop
    assert [t for o in outs[1] for t in o.token_ids] == second
    assert outs[1][-1].finish_reason == "length" and engine.busy() == 0


@FEED
def test_a_first_token_that_ends_the_sequence_frees_its_slot_for_the_next(feed: bool) -> None:
    # a first token is fed to the decode step on the device before the host sees it: when it is a stop token
    # (or max_tokens is 1) that step's row is dropped, and the next request in the slot decodes as if alone
    model = make_model("alibi")

    def alone(prompt: list[int], n: int) -> list[int]:
        return generate(model, None, [prompt], max_new_tokens=n, temperature=0, eos_token_id=[])[0].token_ids

    first, nxt, after = alone(PROMPTS[4], 3)[0], alone(PROMPTS[0], 12), alone(PROMPTS[2], 20)
    engine = Engine(model, None, max_batch=1)
    engine.feed_firsts = feed
    outs: list[list[Output]] = [[], [], []]
    greedy = SamplingParams(temperature=0)
    engine.submit(Request(PROMPTS[4], outs[0].append, greedy, max_tokens=8, stop_token_ids={first}))
    engine.submit(Request(PROMPTS[0], outs[1].append, greedy, max_tokens=1))
    engine.submit(Request(PROMPTS[2], outs[2].append, greedy, max_tokens=20))
    for _ in range(60):
        engine.step()
    assert [(o.token_ids, o.n_tokens, o.finish_reason) for o in outs[0]] == [([], 1, "stop")]
    assert [(o.token_ids, o.finish_reason) for o in outs[1]] == [([nxt[0]], "length")]
    assert [t for o in outs[2] for t in o.token_ids] == after
    assert outs[2][-1].finish_reason == "length" and engine.busy() == 0


def test_an_adapted_model_serves_what_generate_gives_with_its_adapters() -> None:
    """`smalto serve --adapter`: LoRA layers (not merged) decode in the slot step as in `generate`."""
    from smalto.adapters.lora import LoraConfig, adapters, apply_lora

    model = make_model("rope_gqa")
    base = [
        generate(model, None, [p], max_new_tokens=8, temperature=0, eos_token_id=[])[0].token_ids
        for p in PROMPTS
    ]
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(1)
    for a in adapters(model):
        torch.nn.init.normal_(a.lora_B.weight, std=0.5)
    want = [
        generate(model, None, [p], max_new_tokens=8, temperature=0, eos_token_id=[])[0].token_ids
        for p in PROMPTS
    ]
    assert want != base  # the adapters change the answers
    engine = Engine(model, None, max_batch=3, prefill_chunk=8)
    outs: list[list[Output]] = [[] for _ in PROMPTS]
    for i, p in enumerate(PROMPTS):
        engine.submit(
            Request(prompt=p, emit=outs[i].append, params=SamplingParams(temperature=0), max_tokens=8)
        )
    while not all(o and o[-1].finish_reason for o in outs):
        engine.step()
    assert [[t for o in out for t in o.token_ids] for out in outs] == want


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8},
        {"rope_type": "linear", "factor": 4.0},
        # dynamic: theta grows past position 8, each decode row from its own position alone
        {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8},
    ],
    ids=lambda s: s["rope_type"],
)  # fmt: skip
def test_scaled_rope_decodes_as_generate(scaling: dict) -> None:
    """A LLaMA-3.1-style `rope_scaling` reaches the slot step's angles (each row at its own position)."""
    torch.manual_seed(0)
    config = tiny_config(max_seq_len=48, attn_config={"rope": True, "kv_n_heads": 2, "rope_scaling": scaling})
    model = MPTForCausalLM(config).eval()
    want = [
        generate(model, None, [p], max_new_tokens=n, temperature=0, eos_token_id=[])[0].token_ids
        for p, n in zip(PROMPTS, MAX_NEW, strict=True)
    ]
    # whole prompts in one chunk: a dynamic scaling's prefill angles depend on the chunk's longest position
    engine = Engine(model, None, max_batch=3, prefill_chunk=64, min_bucket=16)
    outs = run(engine, {0: [0, 1, 2], 2: [3, 4], 5: [5]})
    assert [[t for o in out for t in o.token_ids] for out in outs] == want
