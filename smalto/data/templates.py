"""Prompt templates of the instruction and chat formats MPT models were finetuned with, as text and as jinja.

DOLLY_PROMPT        the prompt MPT-7B-Instruct was trained with (llm-foundry's dolly preprocessing): double
                    newlines, ending with "### Response:\\n"
MODEL_CARD_PROMPT   the snippet on the MPT-7B-Instruct model card, single newlines; `instruct_prompt` accepts it
                    at inference too
ALPACA_PROMPT_INPUT / ALPACA_PROMPT_NO_INPUT   Stanford Alpaca's published prompts (train.py's PROMPT_DICT)
CHATML_TEMPLATE     ChatML as a tokenizer chat template (MPT-7B-Chat's turn format)
INSTRUCT_TEMPLATE   DOLLY_PROMPT as a tokenizer chat template: each user turn is an instruction, each assistant
                    turn its response followed by EOS
VICUNA_TEMPLATE     Vicuna v1.1's conversation format (FastChat's `vicuna_v1.1`): a system line, then
                    "USER: {turn} ASSISTANT: {answer}</s>" (the EOS token) turn after turn
MPT_7B_CHAT_HUB_TEMPLATE   the chat template the hub's mosaicml/mpt-7b-chat tokenizer_config.json carries
                    (commit ed874721): the system turn has no <|im_end|>, an assistant turn ends with EOS, and
                    add_generation_prompt opens an assistant turn after every message, not only the last
"""

from __future__ import annotations

from typing import Any

from smalto.tokenizer import leading_special_ids

INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
DOLLY_PROMPT = INTRO + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
MODEL_CARD_PROMPT = INTRO + "\n### Instruction:\n{instruction}\n### Response:\n"
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = INTRO + "\n\n### Instruction:\n{instruction}\n\n### Response:"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INSTRUCT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '" + INTRO + "\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the instruct template has user and assistant turns only, not ' "
    "+ message['role']) }}{% endif %}"
    "{% endfor %}"
)
MPT_7B_CHAT_HUB_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% elif not 'system' in messages[0]['role'] %}"
    "{% set loop_messages = messages %}{% set system_message = 'A conversation between a user and an LLM-based AI "
    "assistant. The assistant gives helpful and honest answers.' %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% if system_message != false %}{{ '<|im_start|>system\\n' + system_message.strip() + '\\n'}}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}{% else %}"
    "{{ '\\n' + '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}{% endif %}"
    "{% if (add_generation_prompt == true) %}{{ '\\n' + '<|im_start|>' + 'assistant' + '\\n' }}"
    "{% elif (message['role'] == 'assistant') %}{{ eos_token }}{% endif %}{% endfor %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    '{% set loop_messages = messages[1:] %}{% else %}{% set system = "' + VICUNA_SYSTEM + '" %}'
    "{% set loop_messages = messages %}{% endif %}{{ system + ' ' }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the vicuna template has one system turn first, then user and assistant turns, "
    "not ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "instruct": INSTRUCT_TEMPLATE, "vicuna": VICUNA_TEMPLATE}


def recipe_template(name: str, tokenizer: Any) -> str:
    """TEMPLATES[name] for this tokenizer: after `{{ bos_token }}` when the tokenizer starts a text with its BOS
    (LLaMA's, whose own templates begin so), so that a chat renders as a prompt/response example of the same model
    is trained (smalto.data.finetune) and as `smalto generate` encodes a prompt; unchanged for GPT-NeoX (MPT)."""
    template = TEMPLATES[name]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and leading_special_ids(tokenizer) == (bos,):
        return "{{ bos_token }}" + template
    return template


def instruct_prompt(instruction: str) -> str:
    """The MPT-7B-Instruct prompt for `instruction`; a prompt already in the trained or the model card's format is
    kept as it is."""
    head = INTRO + "\n"
    if instruction.startswith(head) and instruction.rstrip(" ").endswith("### Response:\n"):
        return instruction
    return DOLLY_PROMPT.format(instruction=instruction)
