"""QuadraticSpec self-speculation (DESIGN §5.4): one forward verifies and pre-drafts.

checkpoint ──builder──▶ engine dir ──[runtime: quadratic-spec strategy]──▶ Triton

A cycle carries k drafts d_0..d_{k-1} at positions P..P+k-1 (d_0 is already verified).
The segment is [d_0..d_{k-1}, group_0, ..., group_{k-1}] with group i = k MASK tokens at
positions P+i+1..P+i+k. Drafts attend causally among themselves; group i sees d_0..d_i and
its own group. Only the drafts write K/V; accepting n keeps d_0..d_{n-1}. The next drafts
are group (n-1): slot 0 is the bonus token (the AR prediction for that position) and
slots 1..k-1 its diffusion predictions.
"""

from __future__ import annotations

import torch

from ..segments import Pattern, Segment
from .base import DecodeStrategy
from .linear_spec import acceptance_stats
from .speculative import choose_drafts, verify


def quadratic_mask(k: int) -> torch.Tensor:
    """[k(k+1), k(k+1)] attention mask for k drafts followed by k groups of k masks."""
    n = k * (k + 1)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:k, :k] = torch.ones(k, k, dtype=torch.bool).tril()
    for i in range(k):
        rows = slice(k + i * k, k + (i + 1) * k)
        mask[rows, : i + 1] = True
        mask[rows, rows] = True
    return mask


def first_cycle_mask(prompt_len: int, k: int) -> torch.Tensor:
    """Prompt causal; k trailing masks see the whole prompt and each other; the prompt never sees them."""
    n = prompt_len + k
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[prompt_len:, prompt_len:] = True
    return mask


class QuadraticSpecStrategy(DecodeStrategy):
    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.k = self.block_length()
        self.mask = quadratic_mask(self.k)
        self.phase = "first"
        self.drafts: list[int] = []
        self.draft_logits: torch.Tensor | None = None  # rows d_1..d_{k-1} were drawn from
        self.accepted: list[int] = []

    def _group_rows(self, group: int, first_row: int) -> list[int]:
        """Rows of slots 1..k-1 of `group` (slot 0 takes the AR prediction instead)."""
        start = first_row + group * self.k
        return list(range(start + 1, start + self.k))

    def next_segments(self) -> list[Segment]:
        rid, mask_id, k = self.request.request_id, self.ctx.model.mask_token_id, self.k
        if self.phase == "first":
            prompt, start = self.request.prompt_ids, self.committed  # start > 0 after chunked prefill
            n = len(prompt) - start
            return [Segment(rid, list(prompt[start:]) + [mask_id] * k, list(range(start, len(prompt) + k)), start,
                            Pattern.MASK, write_kv=[True] * n + [False] * k,
                            logit_rows=[n - 1] + list(range(n + 1, n + k)), mask=first_cycle_mask(n, k))]
        P = self.committed
        positions = list(range(P, P + k))
        for i in range(k):
            positions += range(P + i + 1, P + i + 1 + k)
        rows = list(range(k)) + [r for g in range(k) for r in self._group_rows(g, k)]
        return [Segment(rid, self.drafts + [mask_id] * (k * k), positions, P, Pattern.MASK,
                        write_kv=[True] * k + [False] * (k * k), logit_rows=rows, mask=self.mask)]

    def consume(self, logits: list[torch.Tensor]) -> list[int]:
        rows, k = logits[0], self.k
        if self.phase == "first":
            self.committed = len(self.request.prompt_ids)
            self.phase = "cycle"
            forced = self.forced_token()
            seed = forced if forced is not None else self.sample(rows[0])
            self._set_drafts(seed, rows[1:])
            return [seed]
        targets, groups = rows[:k], rows[k:]
        tokens = verify(targets, self.drafts[1:], self.draft_logits, self.params, self.generator)
        self.accepted.append(len(tokens))
        tokens = self.apply_thinking_budget(tokens)
        m = len(tokens)  # d_0..d_{m-1} stay cached; tokens[-1] is the next d_0
        self.committed += m
        group = groups[(m - 1) * (k - 1): m * (k - 1)]
        self._set_drafts(tokens[-1], group)
        return tokens

    def _set_drafts(self, seed: int, slot_logits: torch.Tensor) -> None:
        self.drafts = [seed] + (choose_drafts(slot_logits, self.params, self.generator) if self.k > 1 else [])
        self.draft_logits = slot_logits

    def stats(self) -> dict:
        return acceptance_stats(self.accepted)
