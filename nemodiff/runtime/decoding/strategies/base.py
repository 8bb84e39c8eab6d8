"""The decoding-strategy contract: a strategy owns one request's decode state.

checkpoint ──builder──▶ engine dir ──[runtime: strategies]──▶ Triton

Each engine step asks every running strategy for the segments of its next forward
(`next_segment`), runs them all in one model pass, lets every strategy say what it needs
from its logit rows (`register`, with the step's `Decider`), computes all of it in one
batched pass on the device, copies the answers to the host once, and hands each strategy
its answer (`consume`), which returns the output tokens it decided. Strategies keep only
small host state and do O(1) Python per step; `committed` is the number of cache
positions that are now valid (the engine shrinks the cache to it).
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from nemodiff.engine_format import ModelConfig
from nemodiff.runtime.decoding.bias import wants_adjustment
from nemodiff.runtime.decoding.grammar import greedy_pick  # noqa: F401 (strategies import it from here)
from nemodiff.runtime.decoding.grammar_jobs import MASKS, VERIFY, WALK, GuideJob
from nemodiff.runtime.model.segments import Pattern, Segment, arange
from nemodiff.runtime.request import Request


@dataclass
class StrategyContext:
    model: ModelConfig
    block_length: int
    has_lora: bool
    think_end_id: int | None = None


DRAFT_WINDOW = 4  # verifications that size the grammar walk of a request's next drafts (draft_walk)


class DecodeStrategy(ABC):
    def __init__(self, request: Request, ctx: StrategyContext):
        self.request = request
        self.ctx = ctx
        self.params = request.params
        # the counter-based generator takes a signed 64-bit seed: a seed of 2**63 or more keeps its low bits
        self.seed = self.params.seed & (2**63 - 1) if self.params.seed is not None else secrets.randbits(62)
        self.draw_counter = 0  # advanced by every decision that may draw random numbers
        self.draft_probs = None  # device distributions of sampled drafts (temperature > 0)
        self.committed = 0  # valid KV positions of this request
        self.write_ahead = self.block_length()  # most positions a decode step writes past `committed`
        self._block_start, self._block_positions = -1, None  # positions start..start+block-1, reused while start stays
        # a thinking budget applies (docs/design.md §5.6); without one the budget helpers return at once
        self._budgeted = self.params.max_thinking_tokens is not None and ctx.think_end_id is not None
        self._think_closed = False  # the end-of-thinking token has been emitted
        self._think_seen = 0  # output tokens already searched for it
        self.wants_logprobs = self.params.logprobs is not None
        self.pending_logprobs: list | None = None  # the log-probabilities of what consume() returned
        self._logprob_ask: int | None = None
        self.guide = request.grammar  # structured output (grammar.py), or None
        # drafts built left to right under the grammar (greedy only: a sampled draft's distribution must
        # not depend on the other drafts)
        self.shape_drafts = self.guide is not None and self.params.guided_drafts and self.params.temperature <= 0
        self.adjusts = wants_adjustment(self.params)  # logit bias or min_tokens (bias.py)

    mode = ""  # the registry's name (strategies/__init__.py)

    def boundary(self) -> bool:
        """Whether the request may change modes now ("auto", docs/design.md §5.7): nothing half-verified is
        held, every committed position is the prompt's or the output's but the last output token, which is
        not cached yet. A mode whose output differs from AR's (diffusion) never is."""
        return False

    def resume(self) -> None:
        """Go on from a boundary another strategy of the same request left (see `take_over`)."""
        raise NotImplementedError(f"{type(self).__name__} does not take over requests")

    def take_over(self, other: "DecodeStrategy") -> None:
        """Continue the request `other` held up to its boundary: its cache, its random stream."""
        self.committed, self.seed, self.draw_counter = other.committed, other.seed, other.draw_counter
        self.draft_probs = None
        self.resume()

    @abstractmethod
    def next_segment(self) -> Segment:
        """This request's part of the next forward. The batch is packed before the step's answers
        are consumed, so the segment may share arrays the strategy updates later."""

    @abstractmethod
    def register(self, decider, first_row: int, token_row: int) -> None:
        """Ask the decider for what this step's logits must give (rows from first_row; the
        segment's tokens start at batch token row token_row)."""

    @abstractmethod
    def consume(self, decider) -> list[int]:
        """Read the decider's answers; returns the newly decided output tokens."""

    # helpers shared by the strategies ------------------------------------------------------
    def ask_logprobs(self, decider, first_row: int, count: int, answer: int, offset: int = 0) -> None:
        """With the step's decision: log-probabilities of the tokens it decides for these rows."""
        self._logprob_ask = decider.logprobs(self, first_row, count, answer, offset) if self.wants_logprobs else None

    def logprobs_of(self, decider, tokens: list[int], decided: list[int] | None = None) -> list:
        """The entries of this step's ask for `tokens` (row i gives token i). A token that differs from
        what its row decided (the thinking budget forced it) has no log-probability: NaN."""
        if self._logprob_ask is None:
            return []
        entries = decider.logprob_result(self._logprob_ask, tokens)
        if decided is not None:
            for entry, want in zip(entries, decided):
                if entry.token_id != want:
                    entry.logprob = float("nan")
        return entries
    def adjust_rows(self, decider, first_row: int, count: int, first_index: int | None = None,
                    indices: np.ndarray | None = None, drafts=None, depths=None) -> None:
        """Penalties, logit bias and min-token masks for `count` rows from first_row that decide output indices
        first_index, first_index + 1, ... (default: the next output token's), or `indices`; row i follows the
        output and drafts[:depths[i]] (default: the output alone)."""
        if self.adjusts:
            if indices is None:
                start = len(self.request.output_ids) if first_index is None else first_index
                indices = arange(count) + start
            decider.adjust(self, first_row, indices, drafts, depths)

    def guide_rows(self, decider, first_row: int, drafts=()) -> None:
        """Grammar masks for the rows from first_row: row i after the output and drafts[:i]. At temperature 0
        a verification (grammar_batch.py VERIFY): only rows whose greedy token the grammar refuses are
        masked, up to the first row that does not choose its draft."""
        if self.guide is not None:
            drafts = list(drafts)
            kind = VERIFY if self.params.temperature <= 0 else MASKS
            decider.shape(first_row, 1 + len(drafts), GuideJob(self.guide, 1 + len(drafts), kind, drafts=drafts))

    def shape_greedy(self, decider, first_row: int, count: int, after=(), walk: int | None = None) -> None:
        """Masks for `count` rows whose greedy tokens follow one another (drafts): each row's mask
        stands after the greedy choices of the rows before it; the first `walk` rows (default all)."""
        decider.shape(first_row, count, GuideJob(self.guide, count, WALK, after=after, walk=walk))

    def draft_walk(self, drafts: int) -> int:
        """How many of `drafts` draft rows to build under the grammar: two more than the most tokens one of
        the request's last DRAFT_WINDOW verifications accepted (all at the start; the spec strategies keep
        `accepted`). A shaped draft past that is rarely verified; the rows after the walk keep their unmasked
        greedy tokens, so the output is the same (verification decides it) and only acceptance may change."""
        recent = self.accepted
        if not recent:
            return drafts
        return min(drafts, max(recent[-DRAFT_WINDOW:]) + 2)

    def prefill_segment(self) -> Segment:
        """The rest of the prompt after what the engine already cached (chunked prefill)."""
        prompt, start = self.request.prompt_ids, self.committed
        n = len(prompt)
        return Segment(self.request.request_id, prompt[start:], np.arange(start, n), prefix_len=start,
                       pattern=Pattern.CAUSAL, write_kv=True, logit_rows=[n - start - 1],
                       image_embeds=self.request.image_embeds_for(start, n))

    def tokens_until_forced(self) -> int | None:
        """How many tokens may still be emitted before the end-of-thinking token must be forced
        (thinking budget, docs/design.md §5.6); None when nothing is to be forced."""
        if not self._budgeted or self._thinking_done():
            return None
        return max(self.params.max_thinking_tokens - len(self.request.output_ids), 0)

    def _thinking_done(self) -> bool:
        if not self._think_closed:
            self._think_closed = self.ctx.think_end_id in self.request.output_ids[self._think_seen:]
            self._think_seen = len(self.request.output_ids)
        return self._think_closed

    def forced_token(self) -> int | None:
        """The end-of-thinking token when it is due as the very next token, else None."""
        return self.ctx.think_end_id if self.tokens_until_forced() == 0 else None

    def apply_thinking_budget(self, tokens: list[int]) -> list[int]:
        """Cut a run of new tokens where the budget forces end-of-thinking, and place it there."""
        if not self._budgeted:
            return tokens
        room, end = self.tokens_until_forced(), self.ctx.think_end_id
        if room is None or room >= len(tokens) or end in tokens[:room]:
            return tokens
        return tokens[:room] + [end]

    def block_length(self) -> int:
        return self.params.block_length or self.ctx.block_length

    def block_positions(self, start: int) -> np.ndarray:
        """Positions start..start+block-1 (the same array for as long as the block starts there)."""
        if self._block_start != start:
            self._block_start, self._block_positions = start, arange(self.block_length()) + start
        return self._block_positions


