"""Block diffusion, "FastDiffuser" (docs/design.md §5.2).

checkpoint ──builder──▶ engine dir ──[runtime: diffusion strategy]──▶ Triton

Each block starts as [seed, MASK x (B-1)] at the committed length P. Denoise forwards
(FULL, no KV write) unmask positions by confidence until none is left or an EOS stands
with no mask before it; one CAUSAL commit forward then writes the block's K/V and its
last row gives the next block's seed. A position stays masked while its token is the mask
id: a chosen candidate equal to the mask id leaves it masked, and a block that still holds
masks after B denoising steps fills them with their best non-mask candidates of the last
denoising forward, so no denoised position ever outputs the mask token. (The seed is the
causal prediction, as in AR decoding, and is output as predicted.)

The still-masked positions after the seed are exactly those holding the mask id; the
decisions answer the mask id for a position that stays masked, so a denoising step is one
write of the answers into the block.
"""

from __future__ import annotations

import numpy as np

from nemodiff.runtime.decoding.grammar_jobs import DIFFUSE, GuideJob
from nemodiff.runtime.decoding.grammar_reveal import Diffuse
from nemodiff.runtime.model.segments import Pattern, Segment

from .base import DecodeStrategy


def even_split(total: int, steps: int) -> list[int]:
    """Tokens to unmask per step: total spread over steps, remainder first."""
    base, rest = divmod(total, steps)
    return [base + 1] * rest + [base] * (steps - rest)


class DiffusionStrategy(DecodeStrategy):
    mode = "diffusion"

    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.B = self.block_length()
        self.phase = "prefill"
        self.mask_id = ctx.model.mask_token_id
        self.block = np.full(self.B, self.mask_id, dtype=np.int64)
        self.schedule: list[int] = []
        self.steps = 0
        self.steps_per_block: list[int] = []
        self.stop_ids = request.stop_ids() - {self.mask_id}  # a masked position is no stop
        self.stop_array = np.array(sorted(self.stop_ids), dtype=np.int64)
        self._stop_written = False  # a stop token stands in the current block
        self._rows = np.zeros(0, dtype=np.int64)  # the masked positions (after the seed), in order
        self._handle = None
        self._denoise = self._commit = None  # this block's segments
        self._block_logprobs: list = [None] * self.B  # per block slot: from the step that revealed it

    # -- segments ----------------------------------------------------------------------------
    def next_segment(self) -> Segment:
        if self.phase == "prefill":
            return self.prefill_segment()
        if self.phase == "denoise":
            self._denoise.logit_rows = self._rows
            return self._denoise
        return self._commit

    # -- decisions ---------------------------------------------------------------------------
    def register(self, decider, first_row: int, token_row: int) -> None:
        if self.phase != "denoise":
            self._handle = decider.sample(self, first_row)
            self.adjust_rows(decider, first_row, 1)
            self.guide_rows(decider, first_row)
            if self.wants_logprobs:  # the seed: the causal row of the prefill or commit forward
                self.ask_logprobs(decider, first_row, 1, self._handle)
            return
        tau = self.params.threshold
        k = 0
        if tau is None:
            k = self.schedule[self.steps] if self.steps < len(self.schedule) else 1
            k = min(max(k, 1), len(self._rows))
        # block slot j: the seed (slot 0) is the last output token
        self.adjust_rows(decider, first_row, len(self._rows), indices=self._rows + len(self.request.output_ids) - 1)
        if self.guide is not None:  # before the candidates: their draw counter is this step's
            decider.shape(first_row, len(self._rows), self._guided_step(tau, k, self.steps + 1 >= self.B))
        self._handle = decider.candidates(self, first_row, len(self._rows), self._rows, tau, k,
                                          last_step=self.steps + 1 >= self.B, skip_mask=True)
        if self.wants_logprobs:  # the denoising rows: a revealed token's log-probability at this step
            self.ask_logprobs(decider, first_row, len(self._rows), self._handle)

    def consume(self, decider) -> list[int]:
        answer = decider.result(self._handle)
        if self.phase in ("prefill", "commit"):
            self.committed = len(self.request.prompt_ids) if self.phase == "prefill" else self.committed + self.B
            tokens = self._new_block(int(answer[0]))
            if self.wants_logprobs:
                self.pending_logprobs = self.logprobs_of(decider, tokens, [int(answer[0])])
            return tokens
        if self.wants_logprobs:
            revealed = ~decider.is_mask(self._handle)
            entries = self.logprobs_of(decider, answer.tolist())
            for slot, entry, shown in zip(self._rows.tolist(), entries, revealed.tolist()):
                if shown:
                    self._block_logprobs[slot] = entry
        tokens = self._denoised(answer, decider.is_mask(self._handle))
        if self.wants_logprobs and tokens:
            self.pending_logprobs = self._block_logprobs[1: 1 + len(tokens)]
        return tokens

    def _guided_step(self, tau: float | None, k: int, last: bool) -> GuideJob:
        """A denoising step under a grammar (docs/design.md §12): only the leftmost run of masked
        positions may be revealed, left to right, each under the grammar after the tokens before it. The
        first position of the run is always revealed; the next ones while their confidence (under the
        mask, renormalised) reaches the threshold (top-k schedule: the step's k), all of them at the last
        step. The returned rows allow only the token revealed there, or only the mask id (still masked),
        so the candidates decision writes exactly this. The walk itself is grammar_batch.py's DIFFUSE job."""
        rows, block, temperature = self._rows, self.block, self.params.temperature
        draw = (self.seed, self.draw_counter) if temperature > 0 else None
        run = len(rows)
        if rows[-1] - rows[0] + 1 != run:  # masked slots apart: the leftmost run of them
            run = int(np.flatnonzero(np.diff(rows) != 1)[0]) + 1
        if tau is None and not last:
            run = min(run, k)
        return GuideJob(self.guide, len(rows), DIFFUSE, after=block[1: rows[0]].tolist(), walk=run,
                        diffuse=Diffuse(tau, k, last, temperature, draw), only=self.mask_id)

    def _new_block(self, sampled: int) -> list[int]:
        forced = self.forced_token()
        seed = forced if forced is not None else sampled
        block, B, P = self.block, self.B, self.committed
        block[:] = self.mask_id
        block[0] = seed  # the causal prediction, already output; never masked, whatever its value
        if self.wants_logprobs:
            self._block_logprobs = [None] * B
        room = self.tokens_until_forced()  # > 0 here: at 0 the seed itself was forced
        if room is not None and seed != self.ctx.think_end_id and room < B:
            block[room] = self.ctx.think_end_id  # thinking budget: pre-placed after `room` outputs
        self._rows = np.flatnonzero(block[1:] == self.mask_id) + 1
        self._stop_written = bool(len(self.stop_array)) and bool(np.isin(block[1:], self.stop_array).any())
        self.schedule = even_split(len(self._rows), B)
        self.steps = 0
        positions = self.block_positions(P)
        self._denoise = Segment(self.request.request_id, block, positions, P, Pattern.FULL, write_kv=False,
                                logit_rows=self._rows, shape_key=("denoise", B), kv_end=0)
        self._commit = Segment(self.request.request_id, block, positions, P, Pattern.CAUSAL, write_kv=True,
                               logit_rows=[B - 1], shape_key=("commit", B), kv_end=P + B)
        self.phase = "denoise" if len(self._rows) else "commit"
        if self.phase == "commit":
            self.steps_per_block.append(0)
        return [seed]

    def _denoised(self, answer: np.ndarray, still_masked: np.ndarray) -> list[int]:
        """answer: per masked row the token to write, or the mask id (still masked; never at the last step);
        still_masked: answer == mask id."""
        self.block[self._rows] = answer
        self.steps += 1
        if self.stop_ids and not self._stop_written:
            self._stop_written = not self.stop_ids.isdisjoint(answer.tolist())
        self._rows = self._rows[still_masked]
        end = self._eos_end() if self._stop_written else None
        if end is None and len(self._rows):
            return []
        self.steps_per_block.append(self.steps)
        self.phase = "commit"
        return self.block[1:].tolist() if end is None else self.block[1: end + 1].tolist()

    def _eos_end(self) -> int | None:
        """Index of an EOS with no mask before it (the block can stop there), else None."""
        end = int(np.flatnonzero(np.isin(self.block[1:], self.stop_array))[0]) + 1
        return None if len(self._rows) and self._rows[0] < end else end

    def stats(self) -> dict:
        steps = self.steps_per_block
        return {"denoise_steps_per_block": list(steps),
                "mean_denoise_steps": round(sum(steps) / len(steps), 4) if steps else 0.0}
