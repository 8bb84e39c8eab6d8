"""LinearSpec self-speculation (docs/design.md §5.3): a FULL draft forward, then a CAUSAL verify forward.

checkpoint ──builder──▶ engine dir ──[runtime: linear-spec strategy]──▶ Triton

Draft: [seed, MASK x (B-1)] bidirectional, no KV write, draft adapter on (if the engine
has one and the request wants it). Verify: [seed, d_1..d_{B-1}] causal, KV written; the
accepted drafts and the bonus token are output and the committed length grows by their
count, which drops the K/V of rejected drafts.
"""

from __future__ import annotations

import numpy as np

from nemodiff.runtime.model.segments import Pattern, Segment, arange

from .base import DecodeStrategy


class LinearSpecStrategy(DecodeStrategy):
    mode = "linear-spec"

    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.B = B = self.block_length()
        self.use_lora = bool(self.params.draft_lora and ctx.has_lora)
        # Iterative drafting conditions drafts on later drafts, which breaks the exactness of
        # rejection sampling; it is used at temperature 0 only.
        self.draft_threshold = self.params.draft_threshold if self.params.temperature <= 0 else None
        self.phase = "prefill"
        self.mask_id = ctx.model.mask_token_id
        self.tokens = np.full(B, self.mask_id, dtype=np.int64)  # [seed, d_1..d_{B-1}]
        self.accepted: list[int] = []
        self._all_drafts = arange(B)[1:]  # the slots after the seed
        self._rows = self._all_drafts  # the slots still to draft (the seed, slot 0, never is)
        self._depths = arange(B)  # verifier row i follows i drafts
        self._fresh = False  # at a cycle's start
        self._handle = None
        rid, positions = request.request_id, self.block_positions(0)
        self._draft = Segment(rid, self.tokens, positions, 0, Pattern.FULL, write_kv=False, logit_rows=self._rows,
                              use_lora=self.use_lora, shape_key=("draft", B, self.use_lora), kv_end=0)
        self._verify = Segment(rid, self.tokens, positions, 0, Pattern.CAUSAL, write_kv=True,
                               shape_key=("verify", B), kv_end=B)

    def boundary(self) -> bool:  # a cycle's start: the seed is output, nothing drafted yet
        return self._fresh

    def resume(self) -> None:
        self._start_cycle(self.request.output_ids[-1])

    def next_segment(self) -> Segment:
        P = self.committed
        if self.phase == "prefill":
            return self.prefill_segment()
        if self.phase == "draft":
            self._draft.logit_rows = self._rows
            return self._draft.moved(P, self.block_positions(P), 0)
        return self._verify.moved(P, self.block_positions(P), P + self.B)

    def register(self, decider, first_row: int, token_row: int) -> None:
        if self.phase == "prefill":
            self._handle = decider.sample(self, first_row)
            self.adjust_rows(decider, first_row, 1)
            self.guide_rows(decider, first_row)
            if self.wants_logprobs:
                self.ask_logprobs(decider, first_row, 1, self._handle)
        elif self.phase == "verify":
            self._handle = decider.verify(self, first_row, self.B, token_row)
            # row i verifies d_{i+1} after the output (the seed included) and d_1..d_i
            self.adjust_rows(decider, first_row, self.B, drafts=self.tokens[1:], depths=self._depths)
            self.guide_rows(decider, first_row, self.tokens[1:])  # row i: after the seed and d_1..d_i
            if self.wants_logprobs:  # the verify rows: the causal logits AR would see (answer: n, tokens)
                self.ask_logprobs(decider, first_row, self.B, self._handle, offset=1)
        else:
            # slot j drafts the output token after the seed (the last output token) and d_1..d_{j-1}
            self.adjust_rows(decider, first_row, len(self._rows), indices=self._rows + len(self.request.output_ids) - 1)
            if self.draft_threshold is None:
                self._handle = decider.drafts(self, first_row, len(self._rows))
                if self.shape_drafts:
                    self.shape_greedy(decider, first_row, len(self._rows), walk=self.draft_walk(len(self._rows)))
            else:
                self._handle = decider.candidates(self, first_row, len(self._rows), self._rows,
                                                  self.draft_threshold, 0, last_step=False, skip_mask=False)

    def consume(self, decider) -> list[int]:
        answer = decider.result(self._handle)
        if self.phase == "prefill":
            self.committed = len(self.request.prompt_ids)
            forced = self.forced_token()
            seed = forced if forced is not None else int(answer[0])
            if self.wants_logprobs:
                self.pending_logprobs = self.logprobs_of(decider, [seed], [int(answer[0])])
            return self._start_cycle(seed)
        if self.phase == "draft":
            self._fresh = False
            if self.draft_threshold is None:  # every masked slot gets a draft
                self.tokens[self._rows] = answer
                self.phase = "verify"
                return []
            chosen = answer >= 0  # iterative drafting: -1 marks a slot still masked
            self.tokens[self._rows[chosen]] = answer[chosen]
            self._rows = self._rows[~chosen]
            if not len(self._rows):
                self.phase = "verify"
            return []
        n = int(answer[0])
        decided = answer[1: 1 + n].tolist()
        self.accepted.append(len(decided))
        tokens = self.apply_thinking_budget(decided)
        self.committed += len(tokens)  # the seed and the accepted drafts stay cached
        if self.wants_logprobs:
            self.pending_logprobs = self.logprobs_of(decider, tokens, decided)
        return tokens[:-1] + self._start_cycle(tokens[-1])

    def _start_cycle(self, seed: int) -> list[int]:
        self.tokens[:] = self.mask_id
        self.tokens[0] = seed
        self._rows = self._all_drafts
        self.phase = "draft" if self.B > 1 else "verify"
        self._fresh = True
        return [seed]

    def stats(self) -> dict:
        return acceptance_stats(self.accepted)


def acceptance_stats(accepted: list[int]) -> dict:
    histogram: dict[int, int] = {}
    for n in accepted:
        histogram[n] = histogram.get(n, 0) + 1
    return {"cycles": len(accepted),
            "mean_accepted_length": round(sum(accepted) / len(accepted), 4) if accepted else 0.0,
            "accepted_length_histogram": dict(sorted(histogram.items()))}
