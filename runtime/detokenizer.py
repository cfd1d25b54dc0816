"""Incremental detokenization and stop strings, for one generated sequence.

Decoding the whole output every step costs O(length) per token, O(length^2) per request.
Instead each step decodes a short window: the tokens from `prefix_offset` (a few tokens back,
so that a tokenizer which drops or merges spaces at a piece's start sees the same context as
a full decode) to the end, and emits what it adds past the window's already-emitted part
(`read_offset`). While the newest text ends in U+FFFD (a multi-byte character split across
tokens) nothing is emitted, so the text never shows a character that later changes. For the
byte-level BPE and SentencePiece tokenizers of the Llama family the concatenated deltas equal
`tokenizer.decode(output_ids)`; tests check it on the default model.

Stop strings are searched only in the new tail of the text (the delta plus the last
len(longest stop) - 1 characters before it, where a stop string split across tokens starts).
On a hit the text is cut just before the stop string. While running, `stable_text` also holds
back a tail that may be the start of a stop string, so text handed out only ever grows.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None,
                 min_tokens: int = 0, pieces: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        # pieces: token id -> its text alone, shared by the sequences of one tokenizer and
        # skip_special_tokens. The window before the newest token is that one token on most
        # steps, so the cache spares one of the two decodes per token.
        self.pieces = pieces
        self.min_tokens = min_tokens  # the text of the first min_tokens tokens never stops the sequence
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.stopped = False  # a stop string was found: text ends before it, nothing more is added

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int], final: bool = False) -> bool:
        """Append generated token ids; returns True when the text now contains a stop string
        (it is cut before it). final: the sequence has ended, so flush a trailing partial
        character too (as a full decode would show it)."""
        if self.stopped:
            return True
        self.ids += new_ids
        if self.tokenizer is None:
            return False
        before = len(self.text)
        window = self.ids[self.prefix_offset:self.read_offset]
        if self.pieces is not None and len(window) == 1:
            prefix = self.pieces.get(window[0])
            if prefix is None:
                prefix = self.pieces[window[0]] = self._decode(window)
        else:
            prefix = self._decode(window)
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop and len(self.text) > before and len(self.ids) > self.min_tokens:
            start = max(0, before - self._max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def stable_text(self) -> str:
        """The text less a tail that may turn out to be the start of a stop string."""
        text = self.text
        if self.stopped:
            return text
        for k in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return text[:-k]
        return text
