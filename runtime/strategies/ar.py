"""Autoregressive decoding (DESIGN §5.1): one causal token per forward.

checkpoint ──builder──▶ engine dir ──[runtime: AR strategy]──▶ Triton
"""

from __future__ import annotations

import torch

from ..segments import Pattern, Segment
from .base import DecodeStrategy


class ARStrategy(DecodeStrategy):
    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.last_token: int | None = None

    def next_segments(self) -> list[Segment]:
        if self.last_token is None:
            return [self.prefill_segment()]
        pos = self.committed
        return [Segment(self.request.request_id, [self.last_token], [pos], prefix_len=pos,
                        pattern=Pattern.CAUSAL, write_kv=True)]

    def consume(self, logits: list[torch.Tensor]) -> list[int]:
        self.committed = len(self.request.prompt_ids) if self.last_token is None else self.committed + 1
        forced = self.forced_token()
        token = forced if forced is not None else self.sample(logits[0][-1])
        self.last_token = token
        return [token]
