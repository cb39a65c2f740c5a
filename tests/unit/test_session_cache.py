from __future__ import annotations

import pytest

from dsi.services.model.session_cache import SessionCache, common_prefix_len

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_budget_evicts_least_recently_used_but_never_the_current() -> None:
    cache = SessionCache(new_kv=object, token_budget=10, clock=Clock())
    for sid, n in (("a", 4), ("b", 4), ("c", 4)):
        cache.get(sid).tokens = list(range(n))
    cache.get("a")  # a is now the most recently used
    cache.enforce_budget(keep="c")
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.get("c").tokens = list(range(20))
    cache.enforce_budget(keep="c")
    assert list(cache._sessions) == ["c"]  # over budget alone: kept, it is in use
    assert cache.dropped == 2


def test_ttl_and_release() -> None:
    clock = Clock()
    cache = SessionCache(new_kv=object, ttl_s=10, clock=clock)
    cache.get("old").tokens = [1]
    clock.t = 5
    cache.get("new").tokens = [1]
    clock.t = 12
    cache.expire()
    assert "old" not in cache and "new" in cache
    assert cache.drop("new") and not cache.drop("new")
