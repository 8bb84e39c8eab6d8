"""The engine step loop: schedule, one forward for everyone, let strategies consume.

checkpoint ──builder──▶ engine dir ──[runtime: engine loop]──▶ Triton

`Engine.step()` is one model forward shared by every scheduled request, whatever its
mode. The engine validates requests, keeps per-mode counters, and retires finished or
cancelled requests (their pages are freed at once).
"""

from __future__ import annotations

import itertools
from collections import Counter

from .kv_cache import PagedKVCache
from .model import Model
from .request import Request, SamplingParams
from .scheduler import Scheduler, SchedulerConfig, Sequence
from .strategies import STRATEGIES
from .strategies.base import StrategyContext


class Engine:
    def __init__(self, model: Model, cache: PagedKVCache, ctx: StrategyContext, scheduler_config: SchedulerConfig,
                 max_seq_len: int, eos_ids: list[int], decode):
        self.model = model
        self.cache = cache
        self.ctx = ctx
        self.scheduler = Scheduler(scheduler_config, cache)
        self.max_seq_len = max_seq_len
        self.eos_ids = frozenset(eos_ids)
        self.decode = decode
        self._ids = itertools.count()
        self._sequences: dict[int, Sequence] = {}
        self.num_steps = 0
        self.output_tokens = Counter()  # by mode
        self.forward_passes = Counter()  # request-forwards, by mode

    # -- requests ----------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise ValueError(f"prompt ids must be in [0, {vocab})")
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
        scratch = 0 if params.mode == "ar" else block  # speculative/diffusion writes run ahead by a block
        worst = self.cache.pages_needed(len(prompt_ids) + params.max_new_tokens + scratch)
        if worst > self.cache.num_pages:
            raise ValueError(
                f"request needs up to {worst} KV pages ({len(prompt_ids)} prompt + {params.max_new_tokens} new "
                f"tokens), more than the whole cache ({self.cache.num_pages} pages); give the server more KV memory "
                "or ask for fewer tokens"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        self.validate(prompt_ids, params)
        request = Request(next(self._ids), list(prompt_ids), params, self.eos_ids, self.decode)
        sequence = Sequence(request, STRATEGIES[params.mode](request, self.ctx))
        self._sequences[request.request_id] = sequence
        self.scheduler.add(sequence)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request: Request, reason: str = "cancelled") -> None:
        sequence = self._sequences.pop(request.request_id, None)
        if sequence is None:
            return
        self.scheduler.remove(sequence)
        if not request.finished:
            request._finish(reason)

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One forward for the scheduled requests; returns the requests that finished."""
        work = self.scheduler.schedule()
        if not work:
            return []
        segments = [seg for item in work for seg in item.segments]
        logits = self.model.forward(segments, self.cache)
        self.num_steps += 1
        finished, offset = [], 0
        for item in work:
            mine = logits[offset: offset + len(item.segments)]
            offset += len(item.segments)
            request = item.sequence.request
            request.num_forwards += 1
            self.forward_passes[request.params.mode] += 1
            if not item.is_fill:
                kept = request.append(item.sequence.strategy.consume(mine))
                self.output_tokens[request.params.mode] += len(kept)
            self.scheduler.after_forward(item)
            if request.finished:
                finished.append(request)
        for request in finished:
            self._retire(request)
        return finished

    def _retire(self, request: Request) -> None:
        sequence = self._sequences.pop(request.request_id)
        request.stats |= getattr(sequence.strategy, "stats", dict)()
        if sequence.num_preemptions:
            request.stats["preemptions"] = sequence.num_preemptions
        self.scheduler.remove(sequence)
