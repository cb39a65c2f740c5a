"""Incremental detokenization with stop strings: text deltas that never split a multi-byte character
and never show a stop string (or a prefix of one that may still complete)."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded text of all generated ids
        self.emitted = 0  # characters of text already returned
        self.stopped_at: int | None = None  # index in text where a stop string starts
        # Decode only a short window of recent tokens per push (not the whole output): the text of
        # ids[prefix:read] is already in self.text; ids[read:] are not decoded into it yet.
        self._prefix = 0
        self._read = 0

    def _decode_new(self) -> None:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show."""
        self.ids.append(token_id)
        self._decode_new()
        for s in self.stop:
            idx = self.text.find(s, max(0, self.emitted - len(s)))
            if idx != -1 and (self.stopped_at is None or idx < self.stopped_at):
                self.stopped_at = idx
        if self.stopped_at is not None:
            return self._take(self.stopped_at)
        safe = len(self.text)
        for s in self.stop:  # hold back a suffix that may be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    safe = min(safe, len(self.text) - k)
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text once generation ended (an incomplete character shows as U+FFFD)."""
        if self._read < len(self.ids) and self.stopped_at is None:
            tail = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
            done = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
            self.text += tail[len(done) :]
            self._prefix = self._read = len(self.ids)
        return self._take(self.stopped_at if self.stopped_at is not None else len(self.text))

    @property
    def final_text(self) -> str:
        return self.text[: self.stopped_at] if self.stopped_at is not None else self.text

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
