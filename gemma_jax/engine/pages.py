"""The host side of a paged KV cache: free list, reference counts, automatic prefix caching.

The device holds, per layer, a pool of fixed-size pages (`[pages, K, page_size, H]`); a sequence's
KV is the list of pages its page table names, position p at page `table[p // page_size]`, offset
`p % page_size`. Everything about which page belongs to whom lives here, on the host, in plain
Python: the device step is pure and only reads the tables it is given.

- Page 0 is never handed out: padding tokens of a step write there (a trash page).
- A page has a reference count: the sequences whose tables name it. A page that no sequence
  references goes back to the free list, unless it is a cached full page (below).
- Prefix caching (vLLM's automatic prefix caching): once a sequence has written a *full* page, the
  page is registered under a key = hash(key of the page before it, its `page_size` token ids, the
  adapter id), so a key names the whole prefix up to and including that page. A new sequence with
  the same leading tokens and adapter takes every leading page whose key is registered
  (`match_prefix`: the references go up, nothing is copied) and prefills only the rest. A cached
  page nobody references stays cached and is evicted least recently used first, only when
  `allocate` needs a page and the free list is empty.

Keys are blake2b digests (16 bytes), so two different prefixes never share a page by accident.
Not thread-safe: the scheduler's device thread owns a `PagePool`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

NULL_PAGE = 0  # the trash page: never allocated, written by padding tokens


def page_key(previous: bytes | None, tokens: Sequence[int], adapter: int) -> bytes:
    """The key of a full page: its tokens, its adapter and (through `previous`) every token before."""
    h = hashlib.blake2b(digest_size=16)
    h.update(previous or b"\0" * 16)
    h.update(np.asarray([adapter], np.int64).tobytes())
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


@dataclasses.dataclass
class PoolStats:
    hits: int = 0  # pages found in the prefix cache
    misses: int = 0  # full prompt pages looked up and not found
    evictions: int = 0  # cached pages reclaimed for a new allocation


class PagePool:
    """Pages 1..num_pages-1 of a device page pool (page 0 is the trash page)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"a pool needs at least 2 pages of at least 1 token, got {num_pages} x {page_size}")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self._free: collections.deque[int] = collections.deque(range(1, self.num_pages))
        self._refs = [0] * self.num_pages
        self._key_of: dict[int, bytes] = {}  # cached page -> its key
        self._page_of: dict[bytes, int] = {}  # key -> cached page
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced; LRU first
        self.stats = PoolStats()

    # -- what is left ----------------------------------------------------------------------------
    def available(self) -> int:
        """Pages `allocate` can hand out now: free ones plus cached ones nobody references."""
        return len(self._free) + len(self._idle)

    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of `tokens` positions occupies."""
        return -(-int(tokens) // self.page_size)

    def cached_count(self) -> int:
        """Pages held in the prefix cache (referenced or not)."""
        return len(self._key_of)

    def refs(self, page: int) -> int:
        return self._refs[page]

    def cached(self, page: int) -> bool:
        return page in self._key_of

    # -- sequences take and give back pages -----------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages, each referenced once; None (nothing taken) if fewer are available.
        Free pages go first; then cached unreferenced pages, least recently used first (evicted:
        their keys are forgotten)."""
        if n > self.available():
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
                self.stats.evictions += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """A sequence lets go of its pages: unreferenced pages are freed, or kept as cached (LRU)."""
        for page in pages:
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} is not referenced")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._idle[page] = None  # most recently used last
                else:
                    self._free.append(page)

    # -- prefix caching -------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int], adapter: int) -> list[bytes]:
        """The keys of the full pages of `tokens` (len(tokens) // page_size of them)."""
        keys, previous = [], None
        for start in range(0, len(tokens) - self.page_size + 1, self.page_size):
            previous = page_key(previous, tokens[start:start + self.page_size], adapter)
            keys.append(previous)
        return keys

    def match_prefix(self, tokens: Sequence[int], adapter: int, *, limit: int | None = None) -> list[int]:
        """The cached pages holding the longest run of leading full pages of `tokens` (at most
        `limit` pages), each now referenced once more. Counts hits, and a miss for the first full
        page not found."""
        found = []
        for key in self.keys(tokens, adapter)[:limit]:
            page = self._page_of.get(key)
            if page is None:
                self.stats.misses += 1
                break
            found.append(page)
        for page in found:
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
        self.stats.hits += len(found)
        return found

    def register(self, pages: Sequence[int], tokens: Sequence[int], adapter: int) -> None:
        """Record a sequence's full pages (pages[i] holds tokens[i*page_size:(i+1)*page_size]) in the
        prefix cache, once their KV is written. A key already cached under another page keeps that
        page (this one stays private and is freed when released)."""
        for page, key in zip(pages, self.keys(tokens, adapter)):
            if key in self._page_of or page in self._key_of:
                continue
            self._page_of[key] = page
            self._key_of[page] = key
