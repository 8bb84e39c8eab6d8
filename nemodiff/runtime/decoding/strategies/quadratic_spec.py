"""QuadraticSpec self-speculation (docs/design.md §5.4): one forward verifies and pre-drafts.

checkpoint ──builder──▶ engine dir ──[runtime: quadratic-spec strategy]──▶ Triton

A cycle carries k drafts d_0..d_{k-1} at positions P..P+k-1 (d_0 is already verified).
The segment is [d_0..d_{k-1}, group_0, ..., group_{k-1}] with group i = k MASK tokens at
positions P+i+1..P+i+k. Drafts attend causally among themselves; group i sees d_0..d_i and
its own group. Only the drafts write K/V; accepting n keeps d_0..d_{n-1}. The next drafts
are group (n-1): slot 0 is the bonus token (the AR prediction for that position) and
slots 1..k-1 its diffusion predictions, chosen on the device in the same decision pass.
"""

from __future__ import annotations

import numpy as np

from nemodiff.runtime.decoding.grammar_jobs import VERIFY, FollowUp, GuideJob
from nemodiff.runtime.model.segments import Pattern, Segment, cycle_layout, first_cycle_mask

from .base import DecodeStrategy
from .linear_spec import acceptance_stats


class QuadraticSpecStrategy(DecodeStrategy):
    mode = "quadratic-spec"

    def __init__(self, request, ctx):
        super().__init__(request, ctx)
        self.k = self.block_length()
        self.mask_id = ctx.model.mask_token_id
        self.phase = "first"
        self.tokens = np.full(self.k * (self.k + 1), self.mask_id, dtype=np.int64)  # drafts then groups
        self.accepted: list[int] = []
        self._handles = None
        self._shape = ("quad", self.k)
        self._cycle: Segment | None = None  # the cycle segment, moved along every step

    def boundary(self) -> bool:  # after a cycle: d_0 is output, the next drafts are dropped on a switch
        return self.phase == "cycle"

    def resume(self) -> None:  # a first cycle over what is not cached yet (the last output token)
        self.phase = "first"

    def next_segment(self) -> Segment:
        rid, mask_id, k = self.request.request_id, self.mask_id, self.k
        if self.phase == "first":
            # the prompt (start > 0 after chunked prefill), or on `resume` the last output token
            prompt, start, output = self.request.prompt_ids, self.committed, self.request.output_ids
            known = prompt[start:] + output if start < len(prompt) else output[start - len(prompt):]
            n, end = len(known), start + len(known)
            return Segment(rid, list(known) + [mask_id] * k, np.arange(start, end + k), start,
                           Pattern.MASK, write_kv=np.array([True] * n + [False] * k),
                           logit_rows=[n - 1] + list(range(n + 1, n + k)), mask=first_cycle_mask(n, k),
                           image_embeds=self.request.image_embeds_for(start, len(prompt)) if start < len(prompt)
                           else None)
        P = self.committed
        if self._cycle is None:
            mask, offsets, writes, rows = cycle_layout(k)
            self._cycle = Segment(rid, self.tokens, None, P, Pattern.MASK, write_kv=writes, logit_rows=rows,
                                  mask=mask, shape_key=self._shape, kv_end=P + k, position_offsets=offsets)
            return self._cycle
        return self._cycle.moved(P, None, P + k)

    def register(self, decider, first_row: int, token_row: int) -> None:
        if self.phase == "first":
            seed = decider.sample(self, first_row)
            drafts = decider.drafts(self, first_row + 1, self.k - 1) if self.k > 1 else None
            self._handles = (seed, drafts)
            self.adjust_rows(decider, first_row, self.k)  # the seed's row, then drafts d_1..d_{k-1}
            if self.shape_drafts:  # the seed row, then the drafts after it: one left-to-right walk
                self.shape_greedy(decider, first_row, self.k, walk=1 + self.draft_walk(self.k - 1))
            else:
                self.guide_rows(decider, first_row)
            if self.wants_logprobs:
                self.ask_logprobs(decider, first_row, 1, seed)
        else:
            self._handles = decider.quad(self, first_row, self.k, token_row)
            if self.adjusts:
                indices, depths = self._cycle_indices()
                self.adjust_rows(decider, first_row, self.k * self.k, indices=indices, drafts=self.tokens[1:self.k],
                                 depths=depths)
            if self.shape_drafts:  # verify the targets, then walk the group the cycle keeps
                decider.shape(first_row, self.k * self.k, GuideJob(self.guide, self.k * self.k, VERIFY,
                                                                   drafts=self.tokens[1:self.k].tolist(),
                                                                   walk=self.k, then=self._next_drafts()))
            else:
                self.guide_rows(decider, first_row, self.tokens[1:self.k])
            if self.wants_logprobs:  # the k target rows (answer: n, tokens[k], next drafts)
                self.ask_logprobs(decider, first_row, self.k, self._handles, offset=1)

    def consume(self, decider) -> list[int]:
        k = self.k
        if self.phase == "first":
            seed_handle, drafts_handle = self._handles
            self.committed = len(self.request.prompt_ids) + len(self.request.output_ids)
            self.phase = "cycle"
            forced = self.forced_token()
            decided = int(decider.result(seed_handle)[0])
            seed = forced if forced is not None else decided
            if self.wants_logprobs:
                self.pending_logprobs = self.logprobs_of(decider, [seed], [decided])
            self.tokens[0] = seed
            if drafts_handle is not None:
                self.tokens[1:k] = decider.result(drafts_handle)
            return [seed]
        answer = decider.result(self._handles)
        n = int(answer[0])
        decided = answer[1: 1 + n].tolist()
        self.accepted.append(len(decided))
        tokens = self.apply_thinking_budget(decided)
        if self.wants_logprobs:
            self.pending_logprobs = self.logprobs_of(decider, tokens, decided)
        self.committed += len(tokens)  # d_0..d_{m-1} stay cached; tokens[-1] is the next d_0
        self.tokens[0] = tokens[-1]
        self.tokens[1:k] = answer[1 + k: 2 * k]
        return tokens

    def _next_drafts(self) -> FollowUp:
        """Greedy cycle under a grammar, the follow-up of the target rows' verification (grammar_batch.py):
        when the verification accepted n tokens, d_1..d_{n-1} and the target a_{n-1}, the next drafts are
        group n-1's rows (from row k + (n - 1)(k - 1)), built left to right from where it stands."""
        k = self.k
        return FollowUp(k, k - 1, k - 1, self.draft_walk(k - 1))

    def _cycle_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """The output index each row of a cycle decides: target row i the one after d_0..d_i (d_0 is the last
        output token), then group i's k - 1 rows those after its bonus token a_i; and how many of the drafts
        d_1.. each row follows (target row i and group i: i)."""
        k, out = self.k, len(self.request.output_ids)
        groups = (np.arange(k)[:, None] + np.arange(1, k)[None, :]).reshape(-1)
        depths = np.concatenate((np.arange(k), np.repeat(np.arange(k), k - 1)))
        return np.concatenate((np.arange(k), groups)) + out, depths

    def stats(self) -> dict:
        return acceptance_stats(self.accepted)
