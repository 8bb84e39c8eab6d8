"""The decoding-strategy contract: a strategy owns one request's decode state.

checkpoint ──builder──▶ engine dir ──[runtime: strategies]──▶ Triton

Each engine step asks every running strategy for the segments of its next forward,
runs them all in one model pass, and hands each strategy its logits. The strategy
returns the output tokens it decided and exposes `committed`, the number of cache
positions that are now valid (the engine shrinks the cache to it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from nemodiff.engine_format import ModelConfig

from ..request import Request
from ..sampler import make_generator, sample
from ..segments import Pattern, Segment


@dataclass
class StrategyContext:
    model: ModelConfig
    block_length: int
    has_lora: bool
    think_end_id: int | None = None


class DecodeStrategy(ABC):
    def __init__(self, request: Request, ctx: StrategyContext):
        self.request = request
        self.ctx = ctx
        self.params = request.params
        self.generator = make_generator(self.params.seed)
        self.committed = 0  # valid KV positions of this request

    @abstractmethod
    def next_segments(self) -> list[Segment]:
        """Segments for this request's part of the next forward."""

    @abstractmethod
    def consume(self, logits: list[torch.Tensor]) -> list[int]:
        """Logits of the segments above -> newly decided output tokens."""

    # helpers shared by the strategies ------------------------------------------------------
    def sample(self, logits_row: torch.Tensor) -> int:
        p = self.params
        return sample(logits_row, p.temperature, p.top_k, p.top_p, self.generator)

    def prefill_segment(self) -> Segment:
        """The rest of the prompt after what the engine already cached (chunked prefill)."""
        prompt, start = self.request.prompt_ids, self.committed
        n = len(prompt)
        return Segment(self.request.request_id, list(prompt[start:]), list(range(start, n)), prefix_len=start,
                       pattern=Pattern.CAUSAL, write_kv=True, logit_rows=[n - start - 1])

    def tokens_until_forced(self) -> int | None:
        """How many tokens may still be emitted before the end-of-thinking token must be forced
        (thinking budget, DESIGN §5.6); None when nothing is to be forced."""
        budget, end = self.params.max_thinking_tokens, self.ctx.think_end_id
        if budget is None or end is None or end in self.request.output_ids:
            return None
        return max(budget - len(self.request.output_ids), 0)

    def forced_token(self) -> int | None:
        """The end-of-thinking token when it is due as the very next token, else None."""
        return self.ctx.think_end_id if self.tokens_until_forced() == 0 else None

    def apply_thinking_budget(self, tokens: list[int]) -> list[int]:
        """Cut a run of new tokens where the budget forces end-of-thinking, and place it there."""
        room, end = self.tokens_until_forced(), self.ctx.think_end_id
        if room is None or room >= len(tokens) or end in tokens[:room]:
            return tokens
        return tokens[:room] + [end]

    def block_length(self) -> int:
        return self.params.block_length or self.ctx.block_length
