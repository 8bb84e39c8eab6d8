"""Automatic prefix caching: full KV pages of committed tokens, found again by their prefix (docs/design.md §10).

checkpoint ──builder──▶ engine dir ──[runtime: KV cache ▶ prefix index]──▶ serving

Committed KV is causal in every mode (prefill, AR steps, verify and block commits all write
causally), so a page full of committed tokens depends only on the tokens up to its end (and, in a
VLM, on the images whose placeholders lie there). Such a page is named by a digest chained over
the whole prefix: digest_i = H(digest_{i-1}, the page's token ids, the content digests of images
overlapping it). `PagedKVCache` keeps the index below:
- a request entering the cache reuses the longest run of indexed pages that matches its own
  digests; shared pages are read-only (a request writes only at and after its committed length,
  and a match ends on a page boundary), with one reference per request holding them;
- a page no request holds any more stays indexed, on an LRU list, until a page is needed and none
  is free; then the least recently released is evicted (its digest forgotten).
A listener (`PrefixIndex.listener`, e.g. a Dynamo worker's KV-event publisher) hears every change:
("stored", digest, parent digest or None, page number in its sequence, the sequence's first token, the
tokens of that page and the one before it), ("removed", [digests]) and ("cleared",).
A request's `cache_salt` starts its chain (`tenant_root`): tenants with different salts never share a page.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

ROOT = b"nemodiff-prefix-v1"


def tenant_root(salt: str | None) -> bytes:
    """The first parent digest of a tenant's chains: ROOT without a salt, else a digest of the salt, so that
    pages are found again only by requests with the same `cache_salt` (no salt is a tenant of its own)."""
    if salt is None:
        return ROOT
    return hashlib.blake2b(ROOT + b"/salt/" + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def page_digests(tokens, page_size: int, count: int, parent: bytes = ROOT, start_page: int = 0,
                 extra: Callable[[int, int], bytes] | None = None) -> list[bytes]:
    """Chained digests of pages start_page..start_page+count-1 of `tokens` (all full pages).
    extra(first, end): bytes that also name positions [first, end) (image content digests)."""
    ids = np.asarray(tokens, dtype=np.int64)
    out = []
    for page in range(start_page, start_page + count):
        first, end = page * page_size, (page + 1) * page_size
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(ids[first:end].tobytes())
        if extra is not None:
            h.update(extra(first, end))
        parent = h.digest()
        out.append(parent)
    return out


class PrefixIndex:
    """Digest -> page for indexed pages, and the LRU list of indexed pages nobody holds."""

    def __init__(self):
        self.page_of: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # indexed, unreferenced: evicted oldest first
        self.evictions = 0
        self.listener: Callable[[tuple], None] | None = None  # hears stored / removed / cleared

    def __len__(self) -> int:
        return len(self.digest_of)

    def match(self, digests: list[bytes]) -> list[int]:
        """The pages of the longest run of `digests` (from the first) that are indexed."""
        pages = []
        for digest in digests:
            page = self.page_of.get(digest)
            if page is None:
                break
            pages.append(page)
        return pages

    def add(self, page: int, digest: bytes, event: tuple | None = None) -> bool:
        """Index a page (False when the digest already names another page, or the page is indexed).
        event: (parent digest, page number, first token, tokens) for the listener."""
        if digest in self.page_of or page in self.digest_of:
            return False
        self.page_of[digest] = page
        self.digest_of[page] = digest
        if self.listener is not None and event is not None:
            self.listener(("stored", digest, *event))
        return True

    def forget(self, page: int) -> None:
        """Take one page out of the index (it is about to be rewritten)."""
        digest = self.digest_of.pop(page)
        del self.page_of[digest]
        if self.listener is not None:
            self.listener(("removed", [digest]))

    def holds(self, page: int) -> bool:
        return page in self.digest_of

    def evict(self) -> int | None:
        """Forget the least recently released page and return it (None when there is none)."""
        if not self.idle:
            return None
        page, _ = self.idle.popitem(last=False)
        digest = self.digest_of.pop(page)
        del self.page_of[digest]
        self.evictions += 1
        if self.listener is not None:
            self.listener(("removed", [digest]))
        return page

    def clear(self) -> list[int]:
        """Forget every page; returns the idle ones (they become free)."""
        idle = list(self.idle)
        self.page_of.clear()
        self.digest_of.clear()
        self.idle.clear()
        if self.listener is not None:
            self.listener(("cleared",))
        return idle
