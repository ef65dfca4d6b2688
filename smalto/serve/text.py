"""Token ids → streamed text for one sequence: incremental detokenization, stop strings held back until decided."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smalto.generate import _holdback


class TextStream:
    """Turns a sequence's tokens into text as they come.

    A fast tokenizer decodes incrementally in Rust (the `tokenizers` library's `DecodeStream`, as vLLM's
    detokenizer does): a few microseconds a token, which matters when a step streams 64 rows. Otherwise (a
    tokenizer without the Rust backend, or one that cleans up spaces after decoding) each token decodes a short
    window (the tokens since the last complete character boundary), not the whole sequence. Either way the text
    is the text of `tokenizer.decode(ids)`. `add` returns the text that became final: everything but a partial
    UTF-8 character or a possible start of a stop string. A stop string ends the text just before it
    (`stopped`)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is in self.text
        self._rust, self._stream = _decode_stream(tokenizer)

    def add(self, token: int) -> str:
        self.ids.append(token)
        if self._stream is not None:
            piece = self._stream.step(self._rust, token)
            if piece is not None:  # None: the token ends inside a character
                self.text += piece
                self._read = len(self.ids)
            return self._check_stops()
        decode = self.tokenizer.decode
        head = decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        window = decode(self.ids[self._prefix :], skip_special_tokens=False)
        if len(window) > len(head) and not window.endswith("\ufffd"):
            self.text += window[len(head) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._check_stops()

    def _check_stops(self) -> str:
        if self.stops:
            start = max(0, self.emitted - max(len(s) for s in self.stops))
            hits = [h for h in (self.text.find(s, start) for s in self.stops) if h >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text (the sequence ended): a pending partial character is decoded as it is."""
        if self._stream is not None:
            if not self.stopped and self._read < len(self.ids):
                decode = self.tokenizer.decode
                whole = decode(self.ids, skip_special_tokens=False)
                self.text += whole[len(decode(self.ids[: self._read], skip_special_tokens=False)) :]
                self._read = len(self.ids)
            return self._take(final=True)
        rest = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=False)
        head = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        if not self.stopped and len(rest) > len(head):
            self.text += rest[len(head) :]
            self._read = len(self.ids)
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - _holdback(self.text, self.stops)
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


def _decode_stream(tokenizer: Any) -> tuple[Any, Any]:
    """(the Rust tokenizer, a fresh `DecodeStream`) when incremental decoding in Rust gives `tokenizer.decode`'s
    text; else (None, None)."""
    rust = getattr(tokenizer, "_tokenizer", None)
    if rust is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None, None
    return rust, DecodeStream(skip_special_tokens=False)
