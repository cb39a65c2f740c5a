"""Token prefixes, shared by the orchestrator and the model services: the longest common prefix of
two sequences, and rolling hashes of prefixes, so a Verify window can reference the prefix a target
already holds by its length and hash instead of sending it again (incremental Verify).

``PrefixHashes`` keeps the hash of every prefix of a growing sequence: appending costs O(1) per
token, the hash of any prefix is O(1) to read, and cutting the sequence back costs what it drops. A 61-bit
polynomial hash (mod the Mersenne prime 2^61 - 1) is a checksum against a stale or different
session, not a defence against an adversary: session ids are per request, and a mismatch only
makes the caller send the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterable

MOD = (1 << 61) - 1
BASE = 1_000_003


def common_prefix_len(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the longest common prefix of a and b, given that their first ``start`` tokens agree
    (the comparison starts there: callers that know a common prefix pay only for the rest)."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def extend(h: int, tokens: Iterable[int]) -> int:
    """The hash of a prefix with hash ``h`` followed by ``tokens``."""
    for t in tokens:
        h = (h * BASE + t + 1) % MOD
    return h


class PrefixHashes:
    """``at(k)`` is the hash of the first k tokens of the sequence appended so far."""

    __slots__ = ("_h",)

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._h = [0]
        self.append(tokens)

    def __len__(self) -> int:
        """Tokens covered."""
        return len(self._h) - 1

    def append(self, tokens: Iterable[int]) -> None:
        h = self._h
        last = h[-1]
        for t in tokens:
            last = (last * BASE + t + 1) % MOD
            h.append(last)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (no-op when there are fewer)."""
        del self._h[n + 1 :]

    def at(self, k: int) -> int:
        return self._h[k]
