"""LinearSpec self-speculation (DESIGN §5.3): a FULL draft forward, then a CAUSAL verify forward.

checkpoint ──builder──▶ engine dir ──[runtime: linear-spec strategy]──▶ Triton

Draft: [seed, MASK x (B-1)] bidirectional, no KV write, draft adapter on (if the engine
has one and the request wants it). Verify: [seed, d_1..d_{B-1}] causal, KV written; the
accepted drafts and the bonus token are output and the committed length grows by their
count, which drops the K/V of rejected drafts.
"""

from __future__ import annotations

import torch

from ..segments import Pattern, Segment
from .base import DecodeStrategy
from .speculative import choose_drafts, verify


class LinearSpecStrategy(DecodeStrategy):
    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.B = self.block_length()
        self.use_lora = bool(self.params.draft_lora and ctx.has_lora)
        # Iterative drafting conditions drafts on later drafts, which breaks the exactness of
        # rejection sampling; it is used at temperature 0 only.
        self.draft_threshold = self.params.draft_threshold if self.params.temperature <= 0 else None
        self.phase = "prefill"
        self.seed: int | None = None
        self.drafts: list[int] = []
        self.draft_masked: list[bool] = []
        self.draft_logits: torch.Tensor | None = None
        self.accepted: list[int] = []

    def next_segments(self) -> list[Segment]:
        rid, P = self.request.request_id, self.committed
        positions = list(range(P, P + self.B))
        if self.phase == "prefill":
            return [self.prefill_segment()]
        tokens = [self.seed] + self.drafts
        if self.phase == "draft":
            rows = [j + 1 for j, m in enumerate(self.draft_masked) if m]
            return [Segment(rid, tokens, positions, P, Pattern.FULL, write_kv=False, logit_rows=rows,
                            use_lora=self.use_lora)]
        return [Segment(rid, tokens, positions, P, Pattern.CAUSAL, write_kv=True)]

    def consume(self, logits: list[torch.Tensor]) -> list[int]:
        rows = logits[0]
        if self.phase == "prefill":
            self.committed = len(self.request.prompt_ids)
            forced = self.forced_token()
            return self._start_cycle(forced if forced is not None else self.sample(rows[-1]))
        if self.phase == "draft":
            self._draft_step(rows)
            return []
        tokens = verify(rows, self.drafts, self.draft_logits, self.params, self.generator)
        self.accepted.append(len(tokens))
        tokens = self.apply_thinking_budget(tokens)
        self.committed += len(tokens)  # the seed and the accepted drafts stay cached
        return tokens[:-1] + self._start_cycle(tokens[-1])

    def _start_cycle(self, seed: int) -> list[int]:
        self.seed = seed
        self.drafts = [self.ctx.model.mask_token_id] * (self.B - 1)
        self.draft_masked = [True] * (self.B - 1)
        self.draft_logits = torch.empty(self.B - 1, self.ctx.model.vocab_size)
        self.phase = "draft" if self.B > 1 else "verify"
        return [seed]

    def _draft_step(self, rows: torch.Tensor) -> None:
        open_slots = [j for j, m in enumerate(self.draft_masked) if m]
        candidates = choose_drafts(rows, self.params, self.generator)
        if self.draft_threshold is None:
            chosen = range(len(open_slots))
        else:
            confidence = torch.softmax(rows.double(), dim=-1).max(dim=-1).values
            chosen = {int(i) for i in torch.nonzero(confidence >= self.draft_threshold).flatten()}
            chosen.add(int(confidence.argmax()))
        for i in chosen:
            slot = open_slots[i]
            self.drafts[slot] = candidates[i]
            self.draft_logits[slot] = rows[i]
            self.draft_masked[slot] = False
        if not any(self.draft_masked):
            self.phase = "verify"

    def stats(self) -> dict:
        return acceptance_stats(self.accepted)


def acceptance_stats(accepted: list[int]) -> dict:
    histogram: dict[int, int] = {}
    for n in accepted:
        histogram[n] = histogram.get(n, 0) + 1
    return {"cycles": len(accepted),
            "mean_accepted_length": round(sum(accepted) / len(accepted), 4) if accepted else 0.0,
            "accepted_length_histogram": dict(sorted(histogram.items()))}
