"""Incremental detokenisation for streamed deltas.

Decoding each new token alone breaks on byte-level BPE (a character split over two tokens) and on
tokenizers that drop a leading space when a piece is decoded alone, so the decoder keeps a small
window of context (the prefix/read offsets of vLLM's and TGI's detokenizers): the delta is the
window decoded with the new token minus the window decoded without it, and it is held back while it
ends in an incomplete UTF-8 sequence (U+FFFD). Text that may be the start of a stop string is held
back too, so a client never sees part of a stop string that the final text drops.
"""

from __future__ import annotations


class TextStream:
    """The text of one generated sequence, released piece by piece."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already released
        self._prefix = 0  # window start (context for the next decode)
        self._read = 0  # tokens already turned into `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _held(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        tail = self.text[self.sent:]
        for k in range(min(len(tail), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0

    def delta(self) -> str:
        """New text that is safe to send now."""
        end = len(self.text) - self._held()
        for stop in self.stops:  # a whole stop string: the engine ends the sequence on it; send nothing of it
            at = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                end = min(end, at)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the sequence's final text (the engine's, already cut at a stop string)."""
        sent = self.text[:self.sent]
        out = final_text[len(sent):] if final_text.startswith(sent) else ""
        self.text, self.sent = final_text, len(final_text)
        return out
