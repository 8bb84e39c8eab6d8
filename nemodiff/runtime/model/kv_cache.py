"""Paged KV cache: a pool of fixed-size pages and one page table per request.

checkpoint ──builder──▶ engine dir ──[runtime: KV cache]──▶ Triton

Slot s of the pool holds the key/value of one token for every layer; slot = page * page_size
+ offset. A request's committed length says how many of its positions are valid; writes
past it are scratch until a strategy commits them. Rejected speculative tokens are dropped
by shortening the length, which frees every page beyond what the request's next step writes.

Page tables live in one persistent int32 table (a row per request), mirrored on the host and
on the device. Allocating or freeing a page edits one host element and marks the row dirty;
`sync_tables()` pushes the dirty rows to the device once per step, so no step rebuilds a
table from Python lists. Row 0 is reserved for padding segments (it points at nothing real).
On the CPU reference path the device table is the host mirror itself. The table is sized once,
at its maximum (`max_requests` rows of `max_pages_per_request` pages, plus the padding row), and
`block_tables` stays the same tensor for the cache's life: CUDA graphs captured at engine start
read it, so a growing cache (more requests, longer ones) never recaptures them. A request beyond
`max_requests` is refused with KVCacheFullError (the engine's scheduler never admits that many).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from nemodiff.device import Platform, as_platform

from .prefix_cache import PrefixIndex


class KVCacheFullError(RuntimeError):
    """The page pool cannot hold what a request needs."""


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, num_pages: int,
                 dtype: torch.dtype, device: torch.device | str | Platform = "cpu",
                 max_pages_per_request: int | None = None, max_requests: int = 64, prefix_cache: bool = False):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one slot (got {num_pages} x {page_size})")
        self.page_size = page_size
        self.num_pages = num_pages
        self.platform = as_platform(device)
        self.device = device = self.platform.device
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free: deque[int] = deque(range(num_pages))  # pages nobody holds and the prefix index forgot
        self._refs = np.zeros(num_pages, dtype=np.int32)  # requests holding each page
        self.prefix = PrefixIndex() if prefix_cache else None  # full committed pages by prefix digest
        self._indexed: dict[int, int] = {}  # request -> leading pages of its table offered to the index
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self.max_pages_per_request = max_pages_per_request or num_pages
        self._rows: dict[int, int] = {}
        self.max_requests = max_requests
        self.tables_host = np.zeros((max_requests + 1, self.max_pages_per_request), dtype=np.int32)
        self.pages_per_row = np.zeros(max_requests + 1, dtype=np.int64)  # reserved pages of each row
        self._row_index = self.platform.staging(torch.int64)
        self._row_values = self.platform.staging(torch.int32)
        self._dirty: set[int] = set()
        self.block_tables = self._device_table(self.tables_host)  # this tensor for the cache's life
        self._free_rows = list(range(max_requests, 0, -1))  # row 0 is the padding row

    @staticmethod
    def pages_for_budget(memory_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                         page_size: int, dtype: torch.dtype) -> int:
        per_page = 2 * num_layers * page_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return memory_bytes // per_page

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages a request can take: free ones, and indexed ones nobody holds (evicted on demand)."""
        return len(self._free) + (len(self.prefix.idle) if self.prefix is not None else 0)

    @property
    def num_used_pages(self) -> int:
        """Pages some request holds (indexed pages nobody holds are free to take: not counted)."""
        return self.num_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages in the prefix index, held or not."""
        return len(self.prefix) if self.prefix is not None else 0

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def has_request(self, request_id: int) -> bool:
        return request_id in self._tables

    def add_request(self, request_id: int) -> None:
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already has a page table")
        if not self._free_rows:
            raise KVCacheFullError(f"KV page table full: {self.max_requests} requests already hold rows "
                                   f"(max_requests {self.max_requests}); free one first")
        self._rows[request_id] = self._free_rows.pop()
        self._tables[request_id] = []
        self._lengths[request_id] = 0

    def row(self, request_id: int) -> int:
        """The request's row in `tables_host` / `block_tables`."""
        return self._rows[request_id]

    def length(self, request_id: int) -> int:
        return self._lengths[request_id]

    def capacity(self, request_id: int) -> int:
        return len(self._tables[request_id]) * self.page_size

    def page_table(self, request_id: int) -> list[int]:
        return list(self._tables[request_id])

    # -- growth and shrinkage ----------------------------------------------------------------
    def reserve(self, request_id: int, num_tokens: int) -> None:
        """Make room for positions [0, num_tokens); allocates nothing if the pool is too small."""
        table = self._tables[request_id]
        extra = self.pages_needed(num_tokens) - len(table)
        if extra <= 0:
            return
        if extra > self.num_free_pages:
            raise KVCacheFullError(
                f"KV cache full: request {request_id} needs {extra} more page(s) of {self.page_size} tokens "
                f"for {num_tokens} tokens, {self.num_free_pages} of {self.num_pages} free"
            )
        if len(table) + extra > self.max_pages_per_request:
            raise KVCacheFullError(f"request {request_id}: {num_tokens} tokens exceed the per-request page limit "
                                   f"({self.max_pages_per_request} pages)")
        row = self._rows[request_id]
        for _ in range(extra):
            page = self._free.popleft() if self._free else self.prefix.evict()
            self._refs[page] = 1
            self.tables_host[row, len(table)] = page
            table.append(page)
        self.pages_per_row[row] = len(table)
        self._dirty.add(row)

    def append(self, request_id: int, num_tokens: int) -> torch.Tensor:
        """Grow the committed length by num_tokens; returns their slots."""
        start = self._lengths[request_id]
        self.reserve(request_id, start + num_tokens)
        self._lengths[request_id] = start + num_tokens
        return self.slots(request_id, torch.arange(start, start + num_tokens))

    def set_length(self, request_id: int, length: int, retain: int = 0) -> None:
        """Commit `length` positions (written earlier within the reserved capacity); frees the pages
        beyond the first `length + retain` positions (`retain`: what the request writes past its
        length next step, kept so that speculative steps do not free and re-take a page each time)."""
        if length > self.capacity(request_id):
            raise ValueError(f"request {request_id}: length {length} exceeds reserved capacity "
                             f"{self.capacity(request_id)}")
        if self._indexed.get(request_id, 0) * self.page_size > length:
            self._unindex(request_id, length)
        self._lengths[request_id] = length
        table = self._tables[request_id]
        keep = self.pages_needed(length + retain)
        if len(table) > keep:
            while len(table) > keep:
                self._release(table.pop())
            self.pages_per_row[self._rows[request_id]] = keep

    def truncate(self, request_id: int, length: int) -> None:
        if not 0 <= length <= self._lengths[request_id]:
            raise ValueError(f"request {request_id}: cannot truncate length {self._lengths[request_id]} to {length}")
        self.set_length(request_id, length)

    def free(self, request_id: int) -> None:
        for page in self._tables.pop(request_id, []):
            self._release(page)
        self._indexed.pop(request_id, None)
        self._lengths.pop(request_id, None)
        row = self._rows.pop(request_id, None)
        if row is not None:
            self.pages_per_row[row] = 0
            self._free_rows.append(row)

    def take_scratch_page(self) -> int:
        """Remove one page from the pool for writes nobody reads (padding in replayed graphs)."""
        if not self.num_free_pages:
            raise KVCacheFullError("KV cache full: no page left for the scratch page")
        page = self._free.pop() if self._free else self.prefix.evict()
        self.num_pages -= 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if self.prefix is not None and self.prefix.holds(page):
                self.prefix.idle[page] = None  # stays findable until a page is needed
            else:
                self._free.append(page)

    # -- prefix caching (prefix_cache.py) ----------------------------------------------------
    def match_prefix(self, digests: list[bytes]) -> list[int]:
        """Indexed pages matching the longest run of `digests` (none without a prefix cache)."""
        return self.prefix.match(digests) if self.prefix is not None else []

    def idle_among(self, pages: list[int]) -> int:
        """How many of `pages` nobody holds (sharing them takes them out of the free count)."""
        return sum(1 for page in pages if self._refs[page] == 0)

    def share(self, request_id: int, pages: list[int]) -> None:
        """Start a request's (empty) table with indexed pages, read-only, their tokens committed."""
        table = self._tables[request_id]
        if table:
            raise ValueError(f"request {request_id}: shared pages must start its table")
        if len(pages) > self.max_pages_per_request:
            pages = pages[: self.max_pages_per_request]
        row = self._rows[request_id]
        for page in pages:
            if self._refs[page] == 0:
                self.prefix.idle.pop(page, None)
            self._refs[page] += 1
            self.tables_host[row, len(table)] = page
            table.append(page)
        self.pages_per_row[row] = len(table)
        self._lengths[request_id] = len(pages) * self.page_size
        self._indexed[request_id] = len(pages)
        self._dirty.add(row)

    def offer_pages(self, request_id: int, digests: list[bytes], tokens: list[int] | None = None) -> None:
        """Index the request's full committed pages, digests[i] naming its page i (the first pages
        were offered before and are skipped). tokens: the request's tokens, for the index's listener."""
        if self.prefix is None:
            return
        table, done = self._tables[request_id], self._indexed.get(request_id, 0)
        full = min(len(digests), self._lengths[request_id] // self.page_size, len(table))
        size, hear = self.page_size, tokens is not None and self.prefix.listener is not None
        for i in range(done, full):
            event = ((digests[i - 1] if i else None, i, tokens[0],
                      list(tokens[max(0, (i - 1) * size): (i + 1) * size])) if hear else None)
            self.prefix.add(table[i], digests[i], event)
        self._indexed[request_id] = max(done, full)

    def offered(self, request_id: int) -> int:
        return self._indexed.get(request_id, 0)

    def _unindex(self, request_id: int, length: int) -> None:
        """The request will rewrite positions from `length`: its pages there leave the index (they may
        not be rewritten while another request reads them)."""
        table, keep = self._tables[request_id], length // self.page_size
        for page in table[keep: self._indexed[request_id]]:
            if self._refs[page] > 1:
                raise ValueError(f"request {request_id}: cannot rewrite shared page {page}")
            if self.prefix.holds(page):
                self.prefix.forget(page)
        self._indexed[request_id] = keep

    # -- addressing --------------------------------------------------------------------------
    def slots(self, request_id: int, positions: torch.Tensor) -> torch.Tensor:
        table = self._tables[request_id]
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.numel() and int(positions.max()) >= len(table) * self.page_size:
            raise IndexError(f"request {request_id}: position {int(positions.max())} is beyond its reserved pages")
        pages = torch.from_numpy(self.tables_host[self._rows[request_id], : len(table)].astype(np.int64))
        pages = pages[positions // self.page_size] if table else positions
        return pages * self.page_size + positions % self.page_size

    def sync_tables(self) -> list[int]:
        """Copy the rows changed since the last call to the device table; returns those rows."""
        if not self._dirty:
            return []
        rows = sorted(self._dirty)
        self._dirty.clear()
        if not self.platform.gpu_path:
            return rows  # the host mirror is the table
        index = self._row_index.upload_one(np.asarray(rows, dtype=np.int64))
        values = self._row_values.upload_one(self.tables_host[rows].reshape(-1))
        self.block_tables.index_copy_(0, index, values.view(len(rows), -1))
        return rows

    def mark_tables_changed(self) -> None:
        """Treat every row as changed: the next `sync_tables()` returns (and copies) them all."""
        self._dirty.update(range(self.tables_host.shape[0]))

    def mirror_rows(self, num_rows: int, rows: np.ndarray, values: np.ndarray) -> None:
        """Take page-table rows from another cache (a tensor-parallel worker follows rank 0's tables);
        `values` may cover only the first pages of each row."""
        if num_rows > self.tables_host.shape[0]:
            raise KVCacheFullError(f"KV page table: {num_rows} rows mirrored, this cache holds "
                                   f"{self.tables_host.shape[0]} (max_requests {self.max_requests} + the padding row)")
        if len(rows):
            self.tables_host[rows, : values.shape[1]] = values
            self._dirty.update(rows.tolist())

    def _device_table(self, host: np.ndarray) -> torch.Tensor:
        if not self.platform.gpu_path:
            return torch.from_numpy(host)  # shares memory with the host mirror
        self._dirty.update(range(host.shape[0]))  # the next sync_tables() fills the new table
        return torch.zeros(host.shape, dtype=torch.int32, device=self.device)

    def prefix_slots(self, request_id_row: int, length: int) -> torch.Tensor:
        """Slots of positions [0, length) of the request in `request_id_row`, on the device (reference path)."""
        positions = torch.arange(length, device=self.device)
        pages = self.block_tables[request_id_row, positions // self.page_size].long()
        return pages * self.page_size + positions % self.page_size
