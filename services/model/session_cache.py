"""Per-session KV caches: longest-common-prefix reuse, token budget with LRU eviction, TTL, release."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsi.services.runtime.prefixes import PrefixHashes, common_prefix_len

__all__ = ["CachedSession", "SessionCache", "common_prefix_len"]


@dataclass
class CachedSession:
    """The tokens a session's KV cache holds, and the cache itself (a transformers DynamicCache)."""

    tokens: list[int]
    kv: Any
    last_used: float = field(default_factory=time.monotonic)
    # Hashes of the prefixes of ``tokens`` (kept in step with it by the runner): a Verify may
    # reference a prefix by length and hash instead of sending it.
    hashes: PrefixHashes = field(default_factory=PrefixHashes)


class SessionCache:
    """Session id -> CachedSession, bounded by a total token budget (LRU) and an idle TTL.

    Only the model worker thread touches it, so it needs no lock.
    """

    def __init__(
        self,
        new_kv: Callable[[], Any],
        token_budget: int = 1 << 20,
        ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._new_kv = new_kv
        self._sessions: OrderedDict[str, CachedSession] = OrderedDict()
        self.token_budget = token_budget
        self.ttl_s = ttl_s
        self._clock = clock
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def total_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._sessions.values())

    def get(self, session_id: str) -> CachedSession:
        """The session's cache (a fresh empty one if unknown), marked most recently used."""
        self.expire()
        now = self._clock()
        session = self._sessions.get(session_id)
        if session is None:
            session = CachedSession(tokens=[], kv=self._new_kv(), last_used=now)
            self._sessions[session_id] = session
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def peek(self, session_id: str) -> CachedSession | None:
        """The session's cache if there is one (nothing is created, nothing marked as used)."""
        return self._sessions.get(session_id)

    def reset(self, session: CachedSession) -> None:
        """Start a session over with an empty cache."""
        session.kv = self._new_kv()
        session.tokens = []
        session.hashes = PrefixHashes()

    def drop(self, session_id: str) -> bool:
        if self._sessions.pop(session_id, None) is None:
            return False
        self.dropped += 1
        return True

    def expire(self) -> None:
        """Drop sessions idle for longer than the TTL."""
        deadline = self._clock() - self.ttl_s
        for sid in [sid for sid, s in self._sessions.items() if s.last_used < deadline]:
            self.drop(sid)

    def enforce_budget(self, keep: str) -> None:
        """Evict least recently used sessions (never ``keep``) until the budget holds."""
        total = self.total_tokens
        for sid in list(self._sessions):
            if total <= self.token_budget:
                break
            if sid == keep:
                continue
            total -= len(self._sessions[sid].tokens)
            self.drop(sid)
