"""Fixtures for the eval tests: the real GPT-NeoX tokenizer, tiny random-weight models, the real ICL files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smalto.model.mpt import MPTForCausalLM
from tests.helpers import tiny_config

VOCAB = 50432


@pytest.fixture(scope="session")
def tokenizer(neox_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(neox_tokenizer_dir))


@pytest.fixture(scope="session")
def data_root(shared_dir: Path) -> Path:
    return shared_dir / "icl_data"


def tiny_mpt(max_seq_len: int = 128, seed: int = 0) -> MPTForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(max_seq_len=max_seq_len, vocab_size=VOCAB)
    return MPTForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def mpt() -> MPTForCausalLM:
    return tiny_mpt()


@pytest.fixture(scope="session")
def gpt2():
    """A transformers model that is not MPT: the path for 'any local causal LM'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=96, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Plain forward of one unpadded sequence: (T, V) float."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def direct_mean_ce(model, ctx: list[int], cont: list[int]) -> float:
    """Mean per-token cross-entropy of `cont` after `ctx`, from one full-sequence forward."""
    logits = full_logits(model, ctx + cont)
    pred = logits[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    return float(torch.nn.functional.cross_entropy(pred, torch.tensor(cont)))


def greedy_tokens(model, ctx: list[int], n: int) -> list[int]:
    """n greedy tokens, one full forward per token (no cache, no batching)."""
    ids = list(ctx)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[len(ctx) :]
