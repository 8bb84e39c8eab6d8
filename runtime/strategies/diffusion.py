"""Block diffusion, "FastDiffuser" (DESIGN §5.2).

checkpoint ──builder──▶ engine dir ──[runtime: diffusion strategy]──▶ Triton

Each block starts as [seed, MASK x (B-1)] at the committed length P. Denoise forwards
(FULL, no KV write) unmask positions by confidence until none is left or an EOS stands
with no mask before it; one CAUSAL commit forward then writes the block's K/V and its
last row gives the next block's seed. A position stays masked while its token is the mask
id: a chosen candidate equal to the mask id leaves it masked, and a block that still holds
masks after B denoising steps fills them with their best non-mask candidates of the last
denoising forward, so no denoised position ever outputs the mask token. (The seed is the
causal prediction, as in AR decoding, and is output as predicted.)
"""

from __future__ import annotations

import numpy as np

from ..segments import Pattern, Segment
from .base import DecodeStrategy


def even_split(total: int, steps: int) -> list[int]:
    """Tokens to unmask per step: total spread over steps, remainder first."""
    base, rest = divmod(total, steps)
    return [base + 1] * rest + [base] * (steps - rest)


class DiffusionStrategy(DecodeStrategy):
    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.B = self.block_length()
        self.phase = "prefill"
        self.mask_id = ctx.model.mask_token_id
        self.block = np.full(self.B, self.mask_id, dtype=np.int64)
        self.masked = np.zeros(self.B, dtype=bool)
        self.schedule: list[int] = []
        self.steps = 0
        self.steps_per_block: list[int] = []
        self.stop_array = np.array(sorted(request.stop_ids()), dtype=np.int64)
        self._rows = None
        self._handle = None
        self._denoise_shape = ("denoise", self.B)
        self._commit_shape = ("commit", self.B)

    # -- segments ----------------------------------------------------------------------------
    def next_segment(self) -> Segment:
        rid, P = self.request.request_id, self.committed
        if self.phase == "prefill":
            return self.prefill_segment()
        positions = self.block_positions(P)
        if self.phase == "denoise":
            self._rows = self.masked.nonzero()[0]
            return Segment(rid, self.block, positions, P, Pattern.FULL, write_kv=False, logit_rows=self._rows,
                           shape_key=self._denoise_shape, kv_end=0)
        return Segment(rid, self.block, positions, P, Pattern.CAUSAL, write_kv=True, logit_rows=[self.B - 1],
                       shape_key=self._commit_shape, kv_end=P + self.B)

    # -- decisions ---------------------------------------------------------------------------
    def register(self, decider, first_row: int, token_row: int) -> None:
        if self.phase != "denoise":
            self._handle = decider.sample(self, first_row)
            return
        tau = self.params.threshold
        k = 0
        if tau is None:
            k = self.schedule[self.steps] if self.steps < len(self.schedule) else 1
            k = min(max(k, 1), len(self._rows))
        self._handle = decider.candidates(self, first_row, len(self._rows), self._rows, tau, k,
                                          last_step=self.steps + 1 >= self.B, skip_mask=True)

    def consume(self, decider) -> list[int]:
        answer = decider.result(self._handle)
        if self.phase == "prefill":
            self.committed = len(self.request.prompt_ids)
            return self._new_block(int(answer[0]))
        if self.phase == "commit":
            self.committed += self.B
            return self._new_block(int(answer[0]))
        return self._denoised(answer)

    def _new_block(self, sampled: int) -> list[int]:
        forced = self.forced_token()
        seed = forced if forced is not None else sampled
        self.block[:] = self.mask_id
        self.block[0] = seed
        self.masked[:] = True
        self.masked[0] = False  # the seed is the causal prediction, already output
        room = self.tokens_until_forced()  # > 0 here: at 0 the seed itself was forced
        if room is not None and seed != self.ctx.think_end_id and room < self.B:
            self.block[room] = self.ctx.think_end_id  # thinking budget: pre-placed after `room` outputs
            self.masked[room] = False
        self.schedule = even_split(int(self.masked.sum()), self.B)
        self.steps = 0
        self.phase = "denoise" if self.masked.any() else "commit"
        if self.phase == "commit":
            self.steps_per_block.append(0)
        return [seed]

    def _denoised(self, answer: np.ndarray) -> list[int]:
        """answer: per masked row the token to write, or -1 (still masked; never -1 at the last step)."""
        written = answer >= 0
        rows = self._rows[written]
        self.block[rows] = answer[written]
        self.masked[rows] = False
        self.steps += 1
        end = self._eos_end()
        if end is None and self.masked.any():
            return []
        self.steps_per_block.append(self.steps)
        self.phase = "commit"
        return self.block[1:].tolist() if end is None else self.block[1: end + 1].tolist()

    def _eos_end(self) -> int | None:
        """Index of an EOS with no mask before it (the block can stop there), else None."""
        if not len(self.stop_array):
            return None
        hits = np.flatnonzero(np.isin(self.block[1:], self.stop_array) & ~self.masked[1:])
        if not len(hits):
            return None
        end = int(hits[0]) + 1
        return None if self.masked[1:end].any() else end

    def stats(self) -> dict:
        steps = self.steps_per_block
        return {"denoise_steps_per_block": list(steps),
                "mean_denoise_steps": round(sum(steps) / len(steps), 4) if steps else 0.0}
