"""A conversation with a model: the history as chat messages, formatted with the tokenizer's template (else ChatML)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smalto.generate import Delta, fit_new_tokens, generate
from smalto.model.mpt import MPTForCausalLM


class ChatSession:
    """A conversation: the history as chat messages, formatted with the tokenizer's template (else ChatML).

    `send(text)` appends the user turn, generates the assistant turn (streamed through `callback`) and returns it.
    When the history no longer fits `max_seq_len` with room for the answer, the oldest turns are dropped
    (a system message is kept). An answer budget larger than the context left is clipped to it, and `note` is
    told so once.
    """

    def __init__(
        self,
        model: MPTForCausalLM,
        tokenizer: Any,
        *,
        system: str | None = None,
        note: Callable[[str], None] | None = None,
        **gen_kwargs: Any,
    ):
        from smalto.tokenizer import chat_stop_strings

        self.model, self.tokenizer, self.system, self.gen_kwargs = model, tokenizer, system, gen_kwargs
        self.note, self.noted = note, False
        # history is dropped to leave room for an answer, but never for more than half the context
        self.room = min(gen_kwargs.get("max_new_tokens", 128), model.config.max_seq_len // 2)
        self.stop = [*chat_stop_strings(tokenizer), *(gen_kwargs.pop("stop", None) or [])]
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> str:
        from smalto.tokenizer import apply_chat_template, encode_rendered_chat

        room = self.model.config.max_seq_len - self.room
        first = 1 if self.system else 0
        while True:
            text = apply_chat_template(self.tokenizer, self.messages, add_generation_prompt=True)
            if len(encode_rendered_chat(self.tokenizer, text)) <= room or len(self.messages) - first <= 1:
                return text
            del self.messages[first : first + 2]  # the oldest user/assistant pair

    def send(self, text: str, callback: Callable[[Delta], None] | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        from smalto.tokenizer import encode_rendered_chat

        ids = encode_rendered_chat(self.tokenizer, self._prompt())
        budget, clipped = fit_new_tokens(self.model, len(ids), self.gen_kwargs.get("max_new_tokens", 128))
        if clipped and not self.noted and self.note is not None:
            self.note(clipped)
            self.noted = True
        kwargs = {**self.gen_kwargs, "max_new_tokens": budget}
        (out,) = generate(self.model, self.tokenizer, [ids], stop=self.stop, callback=callback, **kwargs)
        answer = (out.text or "").strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def template_prompt(tokenizer: Any, text: str, template: str) -> str:
    """`text` as the prompt of an instruct model (`instruct`: MPT-7B-Instruct's template, a prompt already in it kept)
    or of a chat model (`chat`: one user turn in the tokenizer's chat template, else ChatML, opening the answer;
    encode it with `smalto.tokenizer.encode_rendered_chat`)."""
    from smalto.data.templates import instruct_prompt
    from smalto.tokenizer import apply_chat_template

    if template == "instruct":
        return instruct_prompt(text)
    return apply_chat_template(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
