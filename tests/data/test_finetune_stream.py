"""Finetuning streams: packing keeps each example's loss, sources mix by proportion, held-out examples stay out of
training, and a stream resumed mid-epoch continues with the very next batch."""

import json
import re

import pytest
import torch

from smalto.data.finetune import FinetuneConfig, FinetuneDataset
from smalto.data.finetune_stream import FinetuneDataConfig, build_finetune_loaders
from smalto.errors import ConfigError, DataError
from tests.model.helpers import tiny, with_impl


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def qa_file(path, n, tag="q"):
    rows = [
        {"prompt": f"{tag} {i} {'x' * (i % 7)}?", "response": f" answer {i}" + " y" * (i % 5)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def per_example_losses(model, rows):
    """Sum of token losses of every example (by sequence id) of every row, in row order."""
    out = []
    for r in rows:
        ids, labels, seq = (r[k][None] for k in ("input_ids", "labels", "sequence_id"))
        logits = model(ids % 128, sequence_id=seq).logits.float()
        tok = torch.nn.functional.cross_entropy(
            logits[0, :-1], (labels[0, 1:] % 128).where(labels[0, 1:] != -100, -100), reduction="none"
        )
        for k in range(int(seq.max()) + 1):
            out.append(float(tok[seq[0, 1:] == k].sum()))
    return out


@pytest.mark.parametrize(("impl", "prompts"), [("eager", "none"), ("sdpa", "none"), ("sdpa", "all")])
def test_packed_rows_give_each_example_its_unpacked_loss(tmp_path, hf_tok, impl, prompts):
    # target_prompts all: an example's first token is no target from the example before it in the row
    path = qa_file(tmp_path / "qa.jsonl", 9)
    cfg = dict(path=path, seq_len=32, target_prompts=prompts)
    packed = FinetuneDataset(FinetuneConfig(**cfg, packing=True), hf_tok)
    single = FinetuneDataset(FinetuneConfig(**cfg, packing=False), hf_tok)
    assert len(packed) < len(single)  # rows really hold several examples
    model = with_impl(tiny(attn_config={"attn_uses_sequence_id": True}, max_seq_len=32), impl)
    order = [e for row in packed.rows for e in row]
    with torch.no_grad():
        got = per_example_losses(model, [packed[i] for i in range(len(packed))])
        ref = per_example_losses(model, [single[i] for i in range(len(single))])
    torch.testing.assert_close(torch.tensor(got), torch.tensor([ref[e] for e in order]), rtol=1e-5, atol=1e-4)


def config(**d) -> FinetuneDataConfig:
    return FinetuneDataConfig.from_dict({"seq_len": 32, **d})


def test_sources_mix_by_proportion_and_held_out_examples_stay_out(tmp_path, hf_tok):
    a, b = qa_file(tmp_path / "a.jsonl", 40, "a"), qa_file(tmp_path / "b.jsonl", 40, "b")
    cfg = config(
        sources=[{"path": a, "proportion": 3, "name": "a"}, {"path": b, "proportion": 1, "name": "b"}],
        packing=False,
        eval_fraction=0.1,
        epoch_size=40,
    )
    loader, held, held_sets = build_finetune_loaders(cfg, hf_tok, rank=0, world_size=1, micro_batch_size=4,
                                                     global_batch_size=4)  # fmt: skip
    assert loader.dataset.counts == [30, 10]
    seen = {hf_tok.decode(r[r != hf_tok.eos_token_id]) for _, r in zip(range(10), (b["input_ids"] for b in loader), strict=False)
            for r in r}  # fmt: skip
    held_text = {hf_tok.decode(ids[:-1]) for d in held_sets for ids, _ in d.examples}
    assert len(held_text) == 8 and not held_text & seen
    assert sum(1 for _ in held) == 2  # one pass of 8 held-out rows in micro-batches of 4


def test_resume_mid_epoch_continues_with_the_next_batch(tmp_path, hf_tok):
    cfg = config(sources=[{"path": qa_file(tmp_path / "qa.jsonl", 120)}], packing=True)

    def loader():
        return build_finetune_loaders(
            cfg, hf_tok, rank=0, world_size=1, micro_batch_size=2, global_batch_size=4
        )[0]

    first = loader()
    it = iter(first)
    for _ in range(2 * 2):  # two optimizer steps of two micro-batches
        next(it)
    state = first.state_dict()
    assert state["sample_in_epoch"] == 8 and state["epoch"] == 0
    expected = [next(it) for _ in range(4)]
    second = loader()
    second.load_state_dict(json.loads(json.dumps(state)))
    got = [b for _, b in zip(range(4), second, strict=False)]
    for e, g in zip(expected, got, strict=True):
        for k in e:
            assert torch.equal(e[k], g[k]), k


def test_too_little_data_and_bad_settings_are_named(tmp_path, hf_tok):
    cfg = config(sources=[{"path": qa_file(tmp_path / "qa.jsonl", 3)}], packing=False)
    with pytest.raises(DataError, match="fewer than one global batch \\(8\\)"):
        build_finetune_loaders(cfg, hf_tok, rank=0, world_size=1, micro_batch_size=8, global_batch_size=8)
    with pytest.raises(
        ConfigError, match=re.escape("unknown key data.sources[0].fmt; allowed keys: path, preprocessing")
    ):
        config(sources=[{"path": "x", "fmt": "y"}])
    with pytest.raises(ConfigError, match=re.escape("data.eval_fraction = 1.5 must be in")):
        config(sources=[{"path": "x"}], eval_fraction=1.5)
