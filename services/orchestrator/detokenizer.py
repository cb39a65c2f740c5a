"""Incremental detokenization with stop strings: text deltas that never split a multi-byte character
and never show a stop string (or a prefix of one that may still complete)."""

from __future__ import annotations

from dsi.services.orchestrator.stop_strings import StopMatcher
from dsi.services.orchestrator.tokenizer import TextTokenizer


class IncrementalText:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._matcher = StopMatcher(stop)
        self._fed = 0  # characters of text given to the matcher
        self.ids: list[int] = []
        self.text = ""  # decoded text of all generated ids
        self.emitted = 0  # characters of text already returned
        self.stopped_at: int | None = None  # index in text where a stop string starts
        # Decode only a short window of recent tokens per push (not the whole output): the text of
        # ids[prefix:read] is already in self.text; ids[read:] are not decoded into it yet.
        self._prefix = 0
        self._read = 0

    def _decode_new(self) -> None:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show."""
        self.ids.append(token_id)
        self._decode_new()
        if self.stopped_at is None:
            self._matcher.feed(self.text[self._fed :])
            self._fed = len(self.text)
            self.stopped_at = self._matcher.match_start
        if self.stopped_at is not None:
            return self._take(self.stopped_at)
        # Hold back a suffix that may be the start of a stop string.
        return self._take(len(self.text) - self._matcher.pending)

    def finish(self) -> str:
        """The rest of the text once generation ended (an incomplete character shows as U+FFFD)."""
        if self._read < len(self.ids) and self.stopped_at is None:
            tail = self.tokenizer.decode(self.ids[self._prefix :])
            done = self.tokenizer.decode(self.ids[self._prefix : self._read])
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
