"""Scheduling: who runs in the next forward, admission, chunked prefill and preemption.

checkpoint ──builder──▶ engine dir ──[runtime: scheduler]──▶ Triton

Admission is FIFO by arrival. Each step first serves the running requests, least recently
served first (so when the token budget cannot fit everyone, those left out go first next
step: nobody waits more than a step behind others of its size), then admits waiting ones
while the sequence limit, the per-step token budget and the free KV pages allow. Prompts
longer than the token budget are prefilled in chunks. When the page pool runs dry the newest
request not yet served this step is preempted: its pages are freed and it goes back to the
waiting queue, keeping its decode state; on readmission its cached tokens (prompt + output
so far) are recomputed and it resumes exactly where it was.

Prefix caching (nemodiff/runtime/model/prefix_cache.py): a request entering the cache first takes the
longest run of indexed pages matching its tokens (a new request: its prompt but the last token,
whose logits it needs; a resumed one: everything it had committed), and recomputes only the rest.
Every page a request fills with committed tokens is offered to the index after its step.
Chains start from the request's `cache_salt`: only requests with the same salt share pages.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from nemodiff.runtime.decoding.strategies.base import DecodeStrategy
from nemodiff.runtime.model.kv_cache import KVCacheFullError, PagedKVCache
from nemodiff.runtime.model.prefix_cache import page_digests, tenant_root
from nemodiff.runtime.model.segments import Pattern, Segment
from nemodiff.runtime.request import Request


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler sees it."""

    request: Request
    strategy: DecodeStrategy
    cache_len: int = 0  # positions recomputed/prefilled by the engine so far
    fill_target: int = 0  # positions the engine fills in chunks before the strategy takes over
    num_preemptions: int = 0
    last_served: int = -1  # the step that last ran it
    digests: list[bytes] = field(default_factory=list)  # prefix-cache digests of its full pages so far
    admitted_before: bool = False
    leader: "Sequence | None" = None  # another choice of the same prompt, admitted first (n > 1)
    auto: object | None = None  # mode="auto": its AutoState (auto.py); the policy swaps `strategy` at boundaries
    request_id: int = field(init=False)

    def __post_init__(self):
        self.request_id = self.request.request_id

    def __lt__(self, other: "Sequence") -> bool:
        return self.request_id < other.request_id

    @property
    def filling(self) -> bool:
        return self.cache_len < self.fill_target

    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.request.output_ids


@dataclass(slots=True)
class ScheduledWork:
    sequence: Sequence
    segment: Segment
    is_fill: bool
    num_tokens: int = 0


class WaitingQueue:
    """Sequences ordered by arrival (preempted ones go back to their place); O(log n) per change."""

    def __init__(self):
        self._heap: list[Sequence] = []
        self._removed: set[int] = set()

    def push(self, seq: Sequence) -> None:
        self._removed.discard(seq.request_id)
        heapq.heappush(self._heap, seq)

    def peek(self) -> Sequence | None:
        while self._heap and self._heap[0].request_id in self._removed:
            self._removed.discard(heapq.heappop(self._heap).request_id)
        return self._heap[0] if self._heap else None

    def pop(self) -> Sequence:
        seq = self.peek()
        heapq.heappop(self._heap)
        return seq

    def remove(self, seq: Sequence) -> bool:
        if seq.request_id in self._removed or seq not in self._heap:
            return False
        self._removed.add(seq.request_id)
        return True

    def __contains__(self, seq: Sequence) -> bool:
        return seq.request_id not in self._removed and seq in self._heap

    def __len__(self) -> int:
        return len(self._heap) - len(self._removed)

    def __iter__(self):
        return (s for s in sorted(self._heap) if s.request_id not in self._removed)


_service_order = attrgetter("last_served", "request_id")  # least recently served first, then oldest


@dataclass
class Scheduler:
    config: SchedulerConfig
    cache: PagedKVCache
    waiting: WaitingQueue = field(default_factory=WaitingQueue)
    running: list[Sequence] = field(default_factory=list)
    step_index: int = 0
    num_preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache (new requests)
    prefix_hits: int = 0  # of which found
    def add(self, sequence: Sequence) -> None:
        self.waiting.push(sequence)

    def has_work(self) -> bool:
        return bool(len(self.waiting) or self.running)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledWork]:
        self.step_index += 1
        budget = self.config.max_num_batched_tokens
        work: list[ScheduledWork] = []
        served: set[int] = set()
        order = sorted(self.running, key=_service_order)
        preempted_before = self.num_preemptions
        for seq in order:
            if self.num_preemptions != preempted_before and seq not in self.running:  # preempted in this loop
                continue
            item = self._plan(seq, budget, first=not work)
            if item is None or not self._reserve_or_preempt(seq, item, served):
                continue
            work.append(item)
            served.add(seq.request_id)
            budget -= item.num_tokens
        while len(self.waiting) and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting.peek()
            if seq.leader is not None and not self._leader_ready(seq.leader):
                break  # one step at most: the leader's prompt pages are offered after its prefill
            hit = self._match(seq)
            new_pages = self.cache.pages_needed(self._admission_tokens(seq, budget, len(hit))) - len(hit)
            if new_pages > self.cache.num_free_pages - self.cache.idle_among(hit):
                break  # strict FIFO: nobody overtakes the head of the queue
            self.waiting.pop()
            self._admit(seq, hit)
            item = self._plan(seq, budget, first=not work)
            if item is None or not self._reserve_or_preempt(seq, item, served):
                continue
            work.append(item)
            served.add(seq.request_id)
            budget -= item.num_tokens
        for item in work:
            item.sequence.last_served = self.step_index
        return work

    @staticmethod
    def _leader_ready(leader: Sequence) -> bool:
        request = leader.request
        return request.finished or bool(request.output_ids)

    def _admission_tokens(self, seq: Sequence, budget: int, hit_pages: int = 0) -> int:
        """Positions the request holds after its first step (the cached ones included)."""
        matched = hit_pages * self.cache.page_size
        target = seq.strategy.committed or len(seq.request.prompt_ids)
        return matched + min(target - matched, budget) + 1

    def _digests(self, seq: Sequence, pages: int) -> list[bytes]:
        """The first `pages` prefix digests of the sequence's tokens (computed once, extended lazily)."""
        have = len(seq.digests)
        if pages > have:
            parent = seq.digests[-1] if have else tenant_root(seq.request.params.cache_salt)
            seq.digests += page_digests(seq.tokens(), self.cache.page_size, pages - have, parent, have,
                                        seq.request.prefix_key if seq.request.images is not None else None)
        return seq.digests[:pages]

    def _match(self, seq: Sequence) -> list[int]:
        """Indexed pages the sequence can start from: a new request keeps its prompt's last token to
        compute (its logits are needed), a resumed one everything it had committed."""
        if self.cache.prefix is None:
            return []
        limit = seq.strategy.committed or len(seq.request.prompt_ids) - 1
        return self.cache.match_prefix(self._digests(seq, limit // self.cache.page_size))

    def _admit(self, seq: Sequence, hit: list[int] = ()) -> None:
        self.cache.add_request(seq.request_id)
        self.cache.share(seq.request_id, list(hit))
        matched = seq.cache_len = len(hit) * self.cache.page_size
        prompt_len = len(seq.request.prompt_ids)
        if not seq.admitted_before:
            seq.admitted_before = True
            seq.request.cached_prompt_tokens = matched
            if self.cache.prefix is not None:
                self.prefix_queries += prompt_len
                self.prefix_hits += matched
        if seq.strategy.committed:  # resuming after preemption: recompute what was cached
            seq.fill_target = seq.strategy.committed
        else:
            seq.strategy.committed = matched  # the strategy's first step starts after the cached prompt
            seq.fill_target = prompt_len - 1 if prompt_len - matched > self.config.max_num_batched_tokens else 0
        self.running.append(seq)

    def _plan(self, seq: Sequence, budget: int, first: bool) -> ScheduledWork | None:
        if seq.filling:
            size = min(seq.fill_target - seq.cache_len, budget)
            start = seq.cache_len
            prompt_len = len(seq.request.prompt_ids)
            if seq.request.images is not None and start < prompt_len:
                # a re-fill with images stops at the prompt's end: an image token the model generated
                # later is text, and the batch splices features into every image token of a segment
                size = min(size, prompt_len - start)
            if size <= 0:
                return None
            tokens = seq.tokens()[start: start + size]
            segment = Segment(seq.request_id, tokens, np.arange(start, start + size), start, Pattern.CAUSAL,
                              write_kv=True, logit_rows=[], kv_end=start + size,
                              image_embeds=seq.request.image_embeds_for(start, start + size))
            return ScheduledWork(seq, segment, True, size)
        segment = seq.strategy.next_segment()
        cost = len(segment.token_ids)
        if cost > budget and not first:
            return None  # waits for a step with room; an oversized step runs alone
        return ScheduledWork(seq, segment, False, cost)

    def _reserve_or_preempt(self, seq: Sequence, item: ScheduledWork, served: set[int]) -> bool:
        need = item.segment.write_end()
        if not need:  # writes nothing (a draft or denoising step)
            return True
        while True:
            try:
                self.cache.reserve(seq.request_id, need)
                return True
            except KVCacheFullError:
                victims = [s for s in self.running if s.request_id not in served and s.request_id > seq.request_id]
                if not victims:
                    self.preempt(seq)
                    return False
                self.preempt(max(victims, key=lambda s: s.request_id))

    # -- state changes -----------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.cache.free(seq.request_id)
        self.running.remove(seq)
        seq.cache_len = 0
        seq.num_preemptions += 1
        self.waiting.push(seq)

    def after_forward(self, item: ScheduledWork) -> None:
        seq = item.sequence
        if item.is_fill:
            seq.cache_len += len(item.segment)
            self.cache.set_length(seq.request_id, seq.cache_len)
            if not seq.filling:
                seq.strategy.committed = seq.fill_target
        elif seq.cache_len != seq.strategy.committed:  # unchanged: no page to free (reserve stayed in write_ahead)
            strategy = seq.strategy
            seq.cache_len = strategy.committed
            self.cache.set_length(seq.request_id, strategy.committed, strategy.write_ahead)
        else:
            return
        if self.cache.prefix is not None:
            self._offer(seq)

    def _offer(self, seq: Sequence) -> None:
        """Offer the pages the sequence filled with committed tokens to the prefix index."""
        full = min(seq.cache_len, len(seq.request.prompt_ids) + len(seq.request.output_ids)) // self.cache.page_size
        if full > len(seq.digests) or (full and full > self.cache.offered(seq.request_id)):
            self.cache.offer_pages(seq.request_id, self._digests(seq, full), seq.tokens())

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free(seq.request_id)
        else:
            self.waiting.remove(seq)
