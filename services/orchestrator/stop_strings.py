"""Stop strings found in the generated text as it grows, at a cost per character that does not grow
with the number of stop strings (an Aho-Corasick automaton, built once per request)."""

from __future__ import annotations


class StopMatcher:
    """Feed the text as it is generated; ``match_start`` is where the earliest stop string found so
    far starts, and ``pending`` how many characters at the end may still begin one (to hold back)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._goto: list[dict[str, int]] = [{}]
        self._fail = [0]
        self._depth = [0]
        self._longest = [0]  # the longest stop string ending at this node (0 = none)
        for stop in stops:
            self._insert(stop)
        self._link()
        self._state = 0
        self._pos = 0  # characters fed
        self.match_start: int | None = None

    def _insert(self, stop: str) -> None:
        node = 0
        for ch in stop:
            nxt = self._goto[node].get(ch)
            if nxt is None:
                nxt = len(self._goto)
                self._goto[node][ch] = nxt
                self._goto.append({})
                self._fail.append(0)
                self._depth.append(self._depth[node] + 1)
                self._longest.append(0)
            node = nxt
        self._longest[node] = max(self._longest[node], len(stop))

    def _link(self) -> None:
        """Failure links, breadth first: a node's link is its longest proper suffix in the trie."""
        queue = list(self._goto[0].values())
        for node in queue:  # the queue grows while it is walked
            for ch, child in self._goto[node].items():
                queue.append(child)
                f = self._fail[node]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                link = self._goto[f].get(ch, 0)
                self._fail[child] = link if link != child else 0
                self._longest[child] = max(self._longest[child], self._longest[self._fail[child]])

    def feed(self, text: str) -> None:
        for ch in text:
            state = self._state
            while state and ch not in self._goto[state]:
                state = self._fail[state]
            state = self._goto[state].get(ch, 0)
            self._state = state
            self._pos += 1
            longest = self._longest[state]
            if longest:
                start = self._pos - longest
                if self.match_start is None or start < self.match_start:
                    self.match_start = start

    @property
    def pending(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        return self._depth[self._state]
