"""The one reader of TRL preference pairs (smalto.data.pairs) behind dpo, reward and ppo: implicit string prompts
for DPO (TRL's ids), the reward model's and PPO's prompts alike, and bad rows named by file, line and field for all."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from smalto.data.pairs import check_pair, read_pairs, read_prompts, tokenize_pair
from smalto.data.preference import preference_dataset
from smalto.errors import DataError

IMPLICIT = [
    {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},
    {"chosen": "abc def", "rejected": "abc dxy"},  # TRL cuts inside the word: "abc d" | "ef"
    {"prompt": None, "chosen": "def f(x):\n    return x", "rejected": "def f(x):\n    pass"},  # a null column
]
CHAT = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "Five."}],
}


@pytest.fixture(scope="module")
def tok(neox_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(neox_tokenizer_dir)


def write(tmp: Path, rows: list, name: str = "p.jsonl") -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_reads_string_pairs_without_a_prompt(tok, tmp_path):
    prompt, chosen, rejected = tokenize_pair(check_pair(IMPLICIT[0])[0], tok)
    assert (tok.decode(prompt), tok.decode(chosen), tok.decode(rejected)) == (
        "Q: 2+2? A:",
        " 4<|endoftext|>",
        " 5<|endoftext|>",
    )
    data = preference_dataset(write(tmp_path, IMPLICIT), tok, max_length=32)
    assert len(data) == 3 and data.stats["skipped_bad"] == 0


def test_implicit_string_prompt_sequences_equal_trls(tok):
    pytest.importorskip("trl")  # in the dev extra
    from datasets import Dataset
    from trl import DPOTrainer

    fake = SimpleNamespace(_tokenizer=tok)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    rows = [{k: v for k, v in row.items() if v is not None} for row in IMPLICIT]
    trl_rows = DPOTrainer._prepare_dataset(fake, Dataset.from_list(rows), tok, args, "train")
    for i, (row, t) in enumerate(zip(IMPLICIT, trl_rows, strict=True)):
        prompt, chosen, rejected = tokenize_pair(check_pair(row)[0], tok)
        assert prompt + chosen == t["prompt_ids"] + t["chosen_ids"]
        assert prompt + rejected == t["prompt_ids"] + t["rejected_ids"]
        if i < 2:
            assert (prompt, chosen, rejected) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
    # TRL's extract_prompt ends the prompt before the last shared space ("def f(x):\n   "), and the indentation
    # token both completions share falls to them; cut at the whitespace, it stays in the prompt
    assert tok.decode(prompt) == "def f(x):\n    " and tok.decode(trl_rows[2]["prompt_ids"]) == "def f(x):\n"


def test_ppo_prompts_are_the_reward_models_prompts(tok, tmp_path):
    path = write(tmp_path, [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, CHAT])
    prompts = read_prompts(path, tok, max_tokens=64)
    assert prompts == [p.prompt for p in read_pairs(path, tok, max_length=64).pairs]
    assert tok.decode(prompts[1]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert read_prompts(path, tok, max_tokens=4) == [
        tok.encode("The sky is")
    ]  # the chat's 20 tokens are left out


def test_llama_prompts_have_one_bos(tmp_path):
    """With a LLaMA tokenizer a string prompt starts with the BOS the tokenizer puts before a text, and a chat
    prompt is its template's rendering with no special token added (the template writes the BOS), as transformers'
    apply_chat_template(tokenize=True) gives it and DPO's pairs tokenize it: one BOS either way."""
    from tests.test_llama import byte_fallback_tokenizer

    llama = byte_fallback_tokenizer(tmp_path / "tok")
    llama.chat_template = "{{ bos_token }}" + llama.chat_template  # LLaMA-2's templates begin so
    bos = llama.bos_token_id
    chat = {"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "hi"}],
            "rejected": [{"role": "assistant", "content": "the"}]}  # fmt: skip
    path = write(tmp_path, [{"prompt": "hello there", "chosen": " fox", "rejected": " dog"}, chat])
    text, chat_ids = read_prompts(path, llama, max_tokens=64)
    assert text == llama("hello there")["input_ids"] and text[0] == bos
    rendered = llama.apply_chat_template(chat["prompt"], tokenize=False, add_generation_prompt=True)
    assert chat_ids == llama(rendered, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1
    assert chat_ids == tokenize_pair(chat, llama)[0]  # DPO's prompt of the same pair


def test_bad_rows_are_named_for_reward_and_ppo(tok, tmp_path):
    bot = {**CHAT, "chosen": [{"role": "bot", "content": "4"}]}
    with pytest.raises(
        DataError, match=r"p\.jsonl:2: field 'chosen'\[0\] has role 'bot'; roles are system, user"
    ):
        read_pairs(write(tmp_path, [CHAT, bot]), tok, max_length=64)
    for row, message in [
        ({"prompt": [{"role": "user"}]}, r"field 'prompt'\[0\] must be an object with a string 'content'"),
        (
            {"prompt": 3, "chosen": "a"},
            "field 'prompt' must be a non-empty string or a list of chat messages",
        ),
    ]:
        with pytest.raises(DataError, match=rf"p\.jsonl:2: {message}"):
            read_prompts(write(tmp_path, [CHAT, row]), tok, max_tokens=64)
    refusing = tok.__class__.from_pretrained(tok.name_or_path)
    refusing.chat_template = "{{ raise_exception('System role not supported') }}"
    for read in (
        lambda p: read_pairs(p, refusing, max_length=64),
        lambda p: read_prompts(p, refusing, max_tokens=64),
    ):
        with pytest.raises(
            DataError, match=r"p\.jsonl:1: the tokenizer's chat template does not render .*System role"
        ):
            read(write(tmp_path, [CHAT]))
