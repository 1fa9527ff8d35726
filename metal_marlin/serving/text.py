"""Incremental detokenization with stop strings."""

from __future__ import annotations


class IncrementalText:
    """The text of generated tokens, released piece by piece. A piece is held back while it ends inside
    a multi-byte character or could be the start of a stop string; the text ends before the first stop
    string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text released so far

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns the newly released text and whether a stop string was reached."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            return self._release(end), True
        return self._release(len(text) - self._held_back(text)), False

    def flush(self) -> str:
        """Whatever is still held back (the generation ended without a stop string)."""
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self.emitted)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece
