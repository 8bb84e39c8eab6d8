"""Autoregressive decoding (docs/design.md §5.1): one causal token per forward.

checkpoint ──builder──▶ engine dir ──[runtime: AR strategy]──▶ Triton
"""

from __future__ import annotations

import numpy as np

from nemodiff.runtime.model.segments import Pattern, Segment

from .base import DecodeStrategy

AR_SHAPE = ("ar",)


class ARStrategy(DecodeStrategy):
    mode = "ar"

    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.last_token: int | None = None
        self.write_ahead = 1
        self._handle = None
        self._token, self._position = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        self._decode = Segment(request.request_id, self._token, self._position, 0, Pattern.CAUSAL, write_kv=True,
                               shape_key=AR_SHAPE, kv_end=1)

    def boundary(self) -> bool:
        return self.last_token is not None

    def resume(self) -> None:
        self.last_token = self.request.output_ids[-1]

    def next_segment(self) -> Segment:
        if self.last_token is None:
            return self.prefill_segment()
        pos = self.committed
        self._token[0], self._position[0] = self.last_token, pos
        return self._decode.moved(pos, self._position, pos + 1)

    def register(self, decider, first_row: int, token_row: int) -> None:
        self._handle = decider.sample(self, first_row)
        self.adjust_rows(decider, first_row, 1)
        self.guide_rows(decider, first_row)
        if self.wants_logprobs:
            self.ask_logprobs(decider, first_row, 1, self._handle)

    def consume(self, decider) -> list[int]:
        self.committed = len(self.request.prompt_ids) if self.last_token is None else self.committed + 1
        forced = self.forced_token()
        decided = int(decider.result(self._handle)[0])
        token = forced if forced is not None else decided
        self.last_token = token
        if self.wants_logprobs:
            self.pending_logprobs = self.logprobs_of(decider, [token], [decided])
        return [token]
