"""The engine step loop: admit, gather segments, one forward, let strategies consume.

checkpoint ──builder──▶ engine dir ──[runtime: engine loop]──▶ Triton

`Engine.step()` is one model forward shared by every running request, whatever its mode.
Admission here is simple FIFO under `max_batch_size` and free KV pages.
"""

from __future__ import annotations

import itertools
from collections import deque

from .kv_cache import KVCacheFullError, PagedKVCache
from .model import Model
from .request import Request, SamplingParams
from .strategies import STRATEGIES
from .strategies.base import DecodeStrategy, StrategyContext


class Engine:
    def __init__(self, model: Model, cache: PagedKVCache, ctx: StrategyContext, max_batch_size: int,
                 max_seq_len: int, eos_ids: list[int], decode):
        self.model = model
        self.cache = cache
        self.ctx = ctx
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.eos_ids = frozenset(eos_ids)
        self.decode = decode
        self.waiting: deque[Request] = deque()
        self.running: dict[int, DecodeStrategy] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max(prompt_ids) >= self.model.config.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt ids must be in [0, {self.model.config.vocab_size})")
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"engine's max_seq_len ({self.max_seq_len})"
            )
        block = params.block_length or self.ctx.block_length
        if params.mode == "quadratic-spec" and block > self.ctx.block_length:
            raise ValueError(f"quadratic-spec draft length {block} exceeds the engine's block length "
                             f"{self.ctx.block_length} (each forward carries k*(k+1) tokens)")
        if block > self.max_seq_len:
            raise ValueError(f"block_length {block} exceeds the engine's max_seq_len ({self.max_seq_len})")
        if params.mode not in STRATEGIES:
            raise ValueError(f"decode mode {params.mode!r} is not available in this build")
        request = Request(next(self._ids), list(prompt_ids), params, self.eos_ids, self.decode)
        self.waiting.append(request)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            if self.cache.pages_needed(len(request.prompt_ids) + 1) > self.cache.num_free_pages:
                if not self.running:
                    raise KVCacheFullError(
                        f"KV cache too small: a {len(request.prompt_ids)}-token prompt needs "
                        f"{self.cache.pages_needed(len(request.prompt_ids) + 1)} pages, "
                        f"the pool has {self.cache.num_free_pages}"
                    )
                return
            self.waiting.popleft()
            self.cache.add_request(request.request_id)
            self.running[request.request_id] = STRATEGIES[request.params.mode](request, self.ctx)

    def step(self) -> list[Request]:
        """One forward for all running requests; returns the requests that finished."""
        self._admit()
        if not self.running:
            return []
        plan = []
        for rid, strategy in self.running.items():
            segments = strategy.next_segments()
            for seg in segments:
                flags = seg.write_flags()
                written = [p for p, f in zip(seg.positions, flags) if f]
                if written:
                    self.cache.reserve(rid, max(written) + 1)
            plan.append((strategy, segments))
        all_segments = [seg for _, segments in plan for seg in segments]
        logits = self.model.forward(all_segments, self.cache)
        self.num_steps += 1
        finished, offset = [], 0
        for strategy, segments in plan:
            mine = logits[offset: offset + len(segments)]
            offset += len(segments)
            request = strategy.request
            request.num_forwards += 1
            request.append(strategy.consume(mine))
            self.cache.set_length(request.request_id, strategy.committed)
            if request.finished:
                finished.append(request)
        for request in finished:
            self._retire(request)
        return finished

    def _retire(self, request: Request) -> None:
        strategy = self.running.pop(request.request_id)
        request.stats |= getattr(strategy, "stats", lambda: {})()
        self.cache.free(request.request_id)

    def abort(self, request: Request, reason: str = "abort") -> None:
        if request.request_id in self.running:
            request._finish(reason)
            self._retire(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            request._finish(reason)
