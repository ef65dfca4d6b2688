"""Finetuning preprocessing: the published templates byte for byte, every file format, bad rows named, chat
templates (ChatML and the hub MPT-7B-Chat template's quirks)."""

import json
import re

import pytest

from smalto.data.finetune import FinetuneConfig, FinetuneDataset
from smalto.data.preprocess import alpaca, dolly, preprocessor
from smalto.data.templates import (
    CHATML_TEMPLATE,
    INSTRUCT_TEMPLATE,
    MPT_7B_CHAT_HUB_TEMPLATE,
    TEMPLATES,
    VICUNA_TEMPLATE,
    instruct_prompt,
    recipe_template,
)
from smalto.errors import ConfigError, DataError

DOLLY_TRAINED = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a primary color.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dolly_is_the_template_mpt_7b_instruct_was_trained_with():
    ex = dolly({"instruction": "Name a primary color.", "context": "", "response": "Blue."})
    assert ex == {"prompt": DOLLY_TRAINED, "response": "Blue."}
    # a context follows the instruction after one newline (llm-foundry's dolly preprocessing); H4's keys work too
    ex = dolly({"instruction": "Summarize.", "input": "Cats sleep a lot.", "output": "Cats nap."})
    assert ex["prompt"].endswith("### Instruction:\nSummarize.\nCats sleep a lot.\n\n### Response:\n")
    assert ex["response"] == "Cats nap."


def test_instruct_prompt_keeps_the_model_card_format_and_wraps_plain_text():
    card = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n### Instruction:\nName a primary color.\n### Response:\n"
    )
    assert instruct_prompt(card) == card
    assert instruct_prompt(DOLLY_TRAINED) == DOLLY_TRAINED
    assert instruct_prompt("Name a primary color.") == DOLLY_TRAINED


def test_alpaca_templates_with_and_without_input():
    no_input = alpaca({"instruction": "Say hi.", "input": "", "output": "Hi!"})
    assert no_input["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:"
    )
    assert no_input["response"] == "\nHi!"
    with_input = alpaca({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert with_input["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nchat\n\n### Response:"
    )


def test_dolly_token_ids_and_mask(tmp_path, hf_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Name a primary color.", "response": "Blue."}])
    row = FinetuneDataset(FinetuneConfig(path=path, seq_len=64, preprocessing="dolly"), hf_tok)[0]
    n = int((row["sequence_id"] == 0).sum())
    ids, labels = row["input_ids"][:n].tolist(), row["labels"][:n].tolist()
    # "\n\n### Response:\n" then "Blue." then EOS (GPT-NeoX ids)
    assert ids[-9:] == [187, 187, 4118, 19371, 27, 187, 22036, 15, 0]
    assert labels[-3:] == [22036, 15, 0] and set(labels[:-3]) == {-100}
    assert hf_tok.decode(ids[:-3]) == DOLLY_TRAINED


def test_a_llama_tokenizer_starts_each_example_with_bos(tmp_path):
    """A prompt/response example starts as `smalto generate` encodes a prompt (and TRL a prompt-completion
    pair): with the BOS a LLaMA tokenizer puts before a text, not a target; a chat is as its template renders it
    (transformers' apply_chat_template adds no special tokens). GPT-NeoX adds none: MPT's ids are unchanged."""
    from tests.test_llama import byte_fallback_tokenizer

    tok = byte_fallback_tokenizer(tmp_path / "tok")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert tok("hello")["input_ids"][0] == bos == 1
    rows = [
        {"prompt": "the quick brown fox", "response": " jumps over"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = FinetuneDataset(FinetuneConfig(path=path, seq_len=64, packing=False), tok)
    ids, labels = data[0]["input_ids"].tolist(), data[0]["labels"].tolist()
    prompt = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    response = tok(" jumps over", add_special_tokens=False)["input_ids"]
    n = 1 + len(prompt) + len(response) + 1
    assert ids[:n] == [bos, *prompt, *response, eos]
    assert labels[:n] == [-100] * (1 + len(prompt)) + [*response, eos]
    text = tok.apply_chat_template(rows[1]["messages"], tokenize=False)
    chat = tok(text, add_special_tokens=False)["input_ids"]
    assert data[1]["input_ids"].tolist()[: len(chat)] == chat and chat[0] != bos

    # the templates a recipe exports start with that BOS too, so the exported chat prompt starts as the examples
    for name in TEMPLATES:
        assert recipe_template(name, tok) == "{{ bos_token }}" + TEMPLATES[name]
    tok.chat_template = recipe_template("instruct", tok)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]  # what apply_chat_template(tokenize=True) gives
    assert text.startswith("<s>Below is an instruction") and ids[0] == bos and ids.count(bos) == 1


def test_gpt_neox_templates_are_unchanged(hf_tok):
    assert {name: recipe_template(name, hf_tok) for name in TEMPLATES} == TEMPLATES


def test_every_file_format_gives_the_same_examples(tmp_path, hf_tok):
    rows = [{"prompt": f"Q{i}: ", "response": f"A{i}"} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text(
        "prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in rows)
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))

    def examples(path):
        ds = FinetuneDataset(FinetuneConfig(path=str(path), seq_len=32, packing=False), hf_tok)
        return [(i.tolist(), lab.tolist()) for i, lab in ds.examples]

    ref = examples(tmp_path / "a.jsonl")
    for name in ("b.json", "c.csv", "d.parquet", "hf"):
        assert examples(tmp_path / name) == ref, name
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", rows[:2])
    write_jsonl(folder / "2.jsonl", rows[2:])
    assert examples(folder) == ref


@pytest.mark.parametrize(
    "row, message",
    [
        ({"instruction": "x"}, "2: field 'response' or 'output' is missing"),
        ({"instruction": "x", "response": " "}, "2: field 'response' is empty"),
        ({"instruction": 3, "response": "y"}, "2: field 'instruction' is int, not a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, hf_tok, row, message):
    good = {"instruction": "a", "response": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(DataError, match=f"bad.jsonl:{message}"):
        FinetuneDataset(FinetuneConfig(path=path, seq_len=64, preprocessing="dolly"), hf_tok)
    ds = FinetuneDataset(
        FinetuneConfig(path=path, seq_len=64, preprocessing="dolly", on_error="skip"), hf_tok
    )
    assert ds.stats["skipped_bad"] == 1 and ds.stats["examples"] == 2


def test_chat_last_message_must_be_the_assistants(tmp_path, hf_tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat, bad])
    with pytest.raises(DataError, match=re.escape("c.jsonl:2: the last message must be the assistant's")):
        FinetuneDataset(FinetuneConfig(path=path, seq_len=64, preprocessing="chat"), hf_tok)


def test_sharegpt_conversations_become_chatml(tmp_path, hf_tok):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [row])
    ds = FinetuneDataset(FinetuneConfig(path=path, seq_len=64, preprocessing="chat"), hf_tok)
    ids, labels = ds.examples[0]
    assert (
        hf_tok.decode(ids)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|endoftext|>"
    )
    assert hf_tok.decode(ids[labels != -100]) == "hello<|im_end|>\n<|endoftext|>"


VICUNA_SYSTEM_LINE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def test_vicuna_template_is_fastchats_vicuna_v1_1(hf_tok):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    hf_tok.chat_template = VICUNA_TEMPLATE
    # FastChat's get_conv_template("vicuna_v1.1").get_prompt() with the EOS token for "</s>"
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        VICUNA_SYSTEM_LINE + " USER: Hi ASSISTANT: Hello!<|endoftext|>USER: 2+2? ASSISTANT:"
    )
    own = [{"role": "system", "content": "Be brief."}, *chat[:2]]
    assert (
        hf_tok.apply_chat_template(own, tokenize=False) == "Be brief. USER: Hi ASSISTANT: Hello!<|endoftext|>"
    )
    hf_tok.chat_template = None


def test_vicuna_rows_train_every_answer_once_with_one_eos(tmp_path, hf_tok):
    import copy

    tok = copy.deepcopy(hf_tok)
    tok.chat_template = VICUNA_TEMPLATE
    row = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    }
    path = write_jsonl(tmp_path / "v.jsonl", [row])
    cfg = FinetuneConfig(path=path, seq_len=128, preprocessing="vicuna", target_responses="all")
    ids, labels = FinetuneDataset(cfg, tok).examples[0]
    assert tok.decode(ids) == (
        VICUNA_SYSTEM_LINE + " USER: Hi ASSISTANT: Hello!<|endoftext|>USER: 2+2? ASSISTANT: 4<|endoftext|>"
    )
    assert tok.decode(ids[labels != -100]) == " Hello!<|endoftext|> 4<|endoftext|>"


def test_a_users_function(tmp_path, hf_tok, monkeypatch):
    (tmp_path / "my_prep.py").write_text(
        "def qa(row):\n    return {'prompt': 'Q: ' + row['q'] + '\\nA:', 'response': ' ' + row['a']}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "2+2?", "a": "4"}])
    ds = FinetuneDataset(FinetuneConfig(path=path, seq_len=64, preprocessing="my_prep:qa"), hf_tok)
    ids, labels = ds.examples[0]
    assert hf_tok.decode(ids) == "Q: 2+2?\nA: 4<|endoftext|>"
    assert hf_tok.decode(ids[labels != -100]) == " 4<|endoftext|>"
    with pytest.raises(
        ConfigError, match="choose one of: prompt_response, dolly, alpaca, chat, vicuna, or module:function"
    ):
        preprocessor("dolli")
    with pytest.raises(ConfigError, match="my_prep has no nothing"):
        preprocessor("my_prep:nothing")


def test_chat_templates_as_transformers_renders_them(hf_tok):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    hf_tok.chat_template = CHATML_TEMPLATE
    assert hf_tok.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    hf_tok.chat_template = INSTRUCT_TEMPLATE
    rendered = hf_tok.apply_chat_template(
        [{"role": "user", "content": "Name a primary color."}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == DOLLY_TRAINED
    # the hub's mosaicml/mpt-7b-chat template: no <|im_end|> after the system turn, EOS after an assistant turn
    hf_tok.chat_template = MPT_7B_CHAT_HUB_TEMPLATE
    text = hf_tok.apply_chat_template(chat, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>"
        "<|endoftext|>"
    )
    ids = hf_tok.apply_chat_template(chat, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[-1] == 0 and hf_tok.convert_ids_to_tokens(ids[-2]) == "|>"
    default = hf_tok.apply_chat_template(chat[1:2], tokenize=False, add_generation_prompt=True)
    assert default == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    hf_tok.chat_template = None
