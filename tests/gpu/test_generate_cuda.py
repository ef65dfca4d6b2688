"""Generation on CUDA reads its tokens through a pinned copy queued before the next step (smalto/generate.py): the
tokens, the streamed text and the ends of rows equal those of a host check after every step (run on a GPU:
`pytest -m gpu tests/gpu`)."""

import pytest
import torch

from smalto.generate import generate, iter_generate
from tests.model.helpers import tiny, tokens

pytestmark = pytest.mark.gpu


def test_checks_every_few_steps_equal_checks_every_step():
    model = tiny(max_seq_len=128).cuda()  # float32: one kernel path, results independent of the check cadence
    prompts = [tokens(1, 12)[0].tolist(), tokens(1, 5, seed=3)[0].tolist()]
    kw = dict(max_new_tokens=20, temperature=0, compile=False)  # no tokenizer: no EOS unless one is given
    every_step = generate(model, None, prompts, check_every=1, **kw)
    for every in (3, 8, 64):
        deltas = list(iter_generate(model, None, prompts, check_every=every, **kw))
        for row, ref in enumerate(every_step):
            assert [t for d in deltas if d.row == row for t in d.token_ids] == ref.token_ids
    # an EOS in the middle of a check window: the row ends there; the step queued after it changes nothing
    eos = every_step[0].token_ids[6]
    one = generate(model, None, prompts, check_every=1, eos_token_id=eos, **kw)
    few = generate(model, None, prompts, check_every=8, eos_token_id=eos, **kw)
    assert [(c.token_ids, c.finish_reason) for c in few] == [(c.token_ids, c.finish_reason) for c in one]
    assert one[0].finish_reason == "eos" and len(one[0].token_ids) <= 6


def test_compiled_generation_is_repeatable_across_cadences():
    model = tiny(max_seq_len=256, d_model=128).cuda().to(torch.bfloat16)
    prompts = [tokens(1, 20)[0].tolist(), tokens(1, 7, seed=3)[0].tolist()]
    kw = dict(max_new_tokens=24, temperature=0, compile=True)
    a = generate(model, None, prompts, check_every=1, **kw)
    b = generate(model, None, prompts, check_every=8, **kw)
    assert model.__dict__["_smalto_decoder"].compiled
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
