"""The paged KV cache's host bookkeeping (gemma_jax/engine/pages.py) against a model kept by hand.

Random admissions and completions of sequences (shared system prompts, different adapters, prompts
that end mid-page) on a small pool, checking after every step: each page's reference count is the
number of live sequences naming it; free, idle-cached and referenced pages partition pages
1..N-1; page 0 is never handed out; every page a prefix match returns holds exactly the tokens
and adapter asked for (the test records what each page was written with); allocation fails only
when too few pages are available. Plus targeted cases: LRU eviction order, the adapter and every
earlier token are part of a page's key, a refused allocation takes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma_jax.engine.pages import NULL_PAGE, PagePool, page_key

PAGE = 4


def check(pool: PagePool, live: dict[int, list[int]]) -> None:
    named = np.zeros(pool.num_pages, int)
    for pages in live.values():
        for page in pages:
            named[page] += 1
    assert [pool.refs(p) for p in range(pool.num_pages)] == named.tolist()
    free, idle = set(pool._free), set(pool._idle)
    referenced = {p for p in range(1, pool.num_pages) if named[p]}
    assert len(free) == len(pool._free) and not (free & idle) and not (free & referenced) and not (idle & referenced)
    assert free | idle | referenced == set(range(1, pool.num_pages))
    assert NULL_PAGE not in free | idle | referenced
    assert all(pool.cached(p) for p in idle)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_random_admissions_and_completions_keep_the_books(data):
    pool = PagePool(num_pages=data.draw(st.integers(4, 24)), page_size=PAGE)
    systems = [list(np.random.default_rng(s).integers(3, 50, 3 * PAGE)) for s in range(2)]
    written: dict[int, tuple[tuple[int, ...], int, bytes]] = {}  # page -> (its tokens, adapter, key)
    live: dict[int, list[int]] = {}
    for step in range(data.draw(st.integers(1, 40))):
        if live and data.draw(st.booleans()):  # a sequence ends
            done = data.draw(st.sampled_from(sorted(live)))
            pool.release(live.pop(done))
        else:  # a sequence arrives: a shared system prompt (or not), its own tail, an adapter
            adapter = data.draw(st.integers(0, 1))
            head = systems[data.draw(st.integers(0, 1))][: data.draw(st.integers(0, 3 * PAGE))]
            tokens = [int(t) for t in head] + data.draw(st.lists(st.integers(3, 50), max_size=2 * PAGE))
            if not tokens:
                continue
            matched = pool.match_prefix(tokens, adapter, limit=(len(tokens) - 1) // PAGE)  # >= 1 token to prefill
            keys = pool.keys(tokens, adapter)
            for i, page in enumerate(matched):
                assert written[page] == (tuple(tokens[i * PAGE:(i + 1) * PAGE]), adapter, keys[i])
            need = pool.pages_for(len(tokens)) - len(matched)
            available = pool.available()
            fresh = pool.allocate(need)
            if fresh is None:
                assert need > available
                pool.release(matched)  # it waits: gives back what it matched
                check(pool, live)
                continue
            assert len(fresh) == need and NULL_PAGE not in fresh
            pages = matched + fresh
            for i, page in enumerate(pages):  # "the device writes the KV"
                if page in fresh:
                    chunk = tuple(tokens[i * PAGE:(i + 1) * PAGE])
                    written[page] = (chunk, adapter, keys[i] if len(chunk) == PAGE else b"")
            pool.register(pages[: len(tokens) // PAGE], tokens, adapter)
            live[step] = pages
        check(pool, live)
    for pages in live.values():
        pool.release(pages)
    check(pool, {})
    assert pool.available() == pool.num_pages - 1


def test_lru_eviction_takes_the_least_recently_released_first():
    pool = PagePool(num_pages=5, page_size=2)  # pages 1..4
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    pa, pb = pool.allocate(2), pool.allocate(2)
    pool.register(pa, a, 0)
    pool.register(pb, b, 0)
    pool.release(pb)  # b's pages released first: least recently used
    pool.release(pa)
    assert pool.available() == 4 and pool.stats.evictions == 0
    assert pool.allocate(2) == pb and pool.stats.evictions == 2  # b evicted, a still cached
    assert pool.match_prefix(a + [9], 0) == pa and pool.match_prefix(b + [9], 0) == []
    assert pool.stats.hits == 2 and pool.stats.misses == 1


def test_a_key_names_the_adapter_and_every_earlier_token():
    pool = PagePool(num_pages=8, page_size=2)
    tokens = [5, 6, 7, 8, 9]
    pages = pool.allocate(3)
    pool.register(pages[:2], tokens, adapter=1)
    assert pool.match_prefix(tokens, adapter=0) == []  # another adapter: nothing shared
    assert pool.match_prefix([5, 6, 7, 9, 9], adapter=1) == pages[:1]  # second page differs
    assert pool.match_prefix([4, 6, 7, 8, 9], adapter=1) == []  # first token differs: no page is the same
    assert pool.match_prefix(tokens, adapter=1) == pages[:2]
    assert page_key(None, [7, 8], 1) != pool.keys(tokens, 1)[1]  # page 2's key includes page 1


def test_a_refused_allocation_takes_nothing():
    pool = PagePool(num_pages=4, page_size=2)
    held = pool.allocate(2)
    assert pool.allocate(2) is None and pool.available() == 1
    pool.release(held)
    assert pool.available() == 3 and sorted(pool.allocate(3)) == [1, 2, 3]
    with pytest.raises(ValueError, match="not referenced"):
        PagePool(3, 2).release([1])
