"""Block diffusion, "FastDiffuser" (DESIGN §5.2).

checkpoint ──builder──▶ engine dir ──[runtime: diffusion strategy]──▶ Triton

Each block starts as [seed, MASK x (B-1)] at the committed length P. Denoise forwards
(FULL, no KV write) unmask positions by confidence until none is left or an EOS stands
with no mask before it; one CAUSAL commit forward then writes the block's K/V and its
last row gives the next block's seed.
"""

from __future__ import annotations

import torch

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
        self.block: list[int] = []
        self.masked: list[bool] = []
        self.schedule: list[int] = []
        self.steps = 0
        self.steps_per_block: list[int] = []

    # -- segments ----------------------------------------------------------------------------
    def next_segments(self) -> list[Segment]:
        rid, P = self.request.request_id, self.committed
        positions = list(range(P, P + self.B))
        if self.phase == "prefill":
            return [self.prefill_segment()]
        if self.phase == "denoise":
            rows = [j for j, m in enumerate(self.masked) if m]
            return [Segment(rid, list(self.block), positions, P, Pattern.FULL, write_kv=False, logit_rows=rows)]
        return [Segment(rid, list(self.block), positions, P, Pattern.CAUSAL, write_kv=True, logit_rows=[self.B - 1])]

    # -- logits ------------------------------------------------------------------------------
    def consume(self, logits: list[torch.Tensor]) -> list[int]:
        rows = logits[0]
        if self.phase == "prefill":
            self.committed = len(self.request.prompt_ids)
            return self._new_block(rows[-1])
        if self.phase == "commit":
            self.committed += self.B
            return self._new_block(rows[-1])
        return self._denoise_step(rows)

    def _new_block(self, last_row: torch.Tensor) -> list[int]:
        forced = self.forced_token()
        seed = forced if forced is not None else self.sample(last_row)
        mask_id = self.ctx.model.mask_token_id
        self.block = [seed] + [mask_id] * (self.B - 1)
        self.masked = [False] + [True] * (self.B - 1)
        room = self._room_after(seed)
        if room is not None and room < self.B - 1:  # thinking budget: end-of-thinking is pre-placed
            self.block[1 + room] = self.ctx.think_end_id
            self.masked[1 + room] = False
        self.schedule = even_split(sum(self.masked), self.B)
        self.steps = 0
        self.phase = "denoise" if any(self.masked) else "commit"
        if self.phase == "commit":
            self.steps_per_block.append(0)
        return [seed]

    def _room_after(self, seed: int) -> int | None:
        room = self.tokens_until_forced()
        if room is None or seed == self.ctx.think_end_id:
            return None
        return room - 1  # the seed itself is about to be emitted

    def _candidates(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(rows.double(), dim=-1)
        if self.params.temperature <= 0:
            confidence, candidates = probs.max(dim=-1)
            return candidates, confidence
        uniform = torch.rand(rows.shape, generator=self.generator, dtype=torch.float64).clamp_(1e-300, 1.0)
        gumbel = -torch.log(-torch.log(uniform))
        candidates = (rows.double() / self.params.temperature + gumbel).argmax(dim=-1)
        return candidates, probs.gather(-1, candidates[:, None])[:, 0]

    def _denoise_step(self, rows: torch.Tensor) -> list[int]:
        positions = [j for j, m in enumerate(self.masked) if m]
        candidates, confidence = self._candidates(rows)
        tau = self.params.threshold
        if tau is not None:
            chosen = {int(i) for i in torch.nonzero(confidence >= tau).flatten()}
            chosen.add(int(confidence.argmax()))
        else:
            k = self.schedule[self.steps] if self.steps < len(self.schedule) else 1
            k = min(max(k, 1), len(positions))
            chosen = {int(i) for i in torch.topk(confidence, k).indices}
        for i in chosen:
            self.block[positions[i]] = int(candidates[i])
            self.masked[positions[i]] = False
        self.steps += 1
        end = self._eos_end()
        if any(self.masked) and end is None:
            return []
        self.steps_per_block.append(self.steps)
        self.phase = "commit"
        return self.block[1:] if end is None else self.block[1: end + 1]

    def _eos_end(self) -> int | None:
        """Index of an EOS with no mask before it (the block can stop there), else None."""
        if self.params.ignore_eos:
            return None
        stops = self.request.eos_ids | set(self.params.stop_token_ids)
        for j in range(1, self.B):
            if self.masked[j]:
                return None
            if self.block[j] in stops:
                return j
        return None

    def stats(self) -> dict:
        steps = self.steps_per_block
        return {"denoise_steps_per_block": list(steps),
                "mean_denoise_steps": round(sum(steps) / len(steps), 4) if steps else 0.0}
