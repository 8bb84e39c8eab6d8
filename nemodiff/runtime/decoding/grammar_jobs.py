"""Structured output, batched: what a step's grammar work is made of (jobs) and gives back (rows).

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ grammar jobs of the whole step]──▶ Triton

A strategy describes its grammar work of a step as a `GuideJob` (one of the kinds below, over its logit
rows, maybe with a `FollowUp`); grammar_batch.py `run_jobs` walks all of a step's jobs (in C++ where it
can, grammar_native.py) and returns `StepRows`: bitmask rows of MASKS jobs, and every other guided row
that allows one token (`OnlyTokens` per job when iterated). `Scratch` keeps the arrays from step to step.
"""

from __future__ import annotations

import numpy as np

from .grammar import GuideMatcher
from .grammar_reveal import Diffuse

MASKS, VERIFY, WALK, DIFFUSE = "masks", "verify", "walk", "diffuse"


class FollowUp:
    """A WALK over `count` rows (walking at most `walk`) after a job that decided n >= 1 rows, from its row
    first + (n - 1) * stride, standing where that job's tokens left the grammar (a QuadraticSpec cycle: the
    verification of the targets accepted n tokens; the group after the last, its next drafts)."""

    __slots__ = ("first", "stride", "count", "walk")

    def __init__(self, first: int, stride: int, count: int, walk: int):
        self.first, self.stride, self.count, self.walk = first, stride, count, walk


class GuideJob:
    """One request's grammar work of a step: `count` logit rows from the first row it is registered at.
    after: tokens standing before row 0 (accepted first); drafts: MASKS and VERIFY rows' look-ahead;
    walk: the most rows walked (default count); then: a `FollowUp`, the walk that depends on this job's
    result; only: a DIFFUSE job's rows come back as OnlyTokens, the unrevealed rows allowing this id."""

    __slots__ = ("guide", "count", "kind", "after", "drafts", "walk", "diffuse", "then", "only", "picks",
                 "base", "row", "depth", "taken", "settled", "failed", "root", "accept", "never", "stops")

    def __init__(self, guide: GuideMatcher, count: int, kind: str, after=(), drafts=(), walk: int | None = None,
                 diffuse: Diffuse | None = None, then: FollowUp | None = None, only: int | None = None):
        self.guide, self.count, self.kind = guide, count, kind
        self.after, self.drafts = list(after), list(drafts)
        self.walk = count if walk is None else min(walk, count)
        if kind == MASKS:
            self.walk = min(self.walk, len(self.drafts) + 1)
        self.diffuse, self.then, self.only = diffuse, then, only
        self.picks: list[int] = []  # the token each walked row decided, in order
        # first output row, first logit row, rows walked, tokens accepted by the walk (rolled back at the end
        # but a verification's or denoising step's own), `after` tokens accepted (kept: the matcher's ahead)
        self.base = self.row = self.depth = self.taken = self.settled = 0
        self.failed = False
        self.root = self  # the job whose rows and look-ahead a follow-up shares


class OnlyTokens:
    """Rows that each allow one token (tokens[i] for row i; -1: the row allows everything), or None: rows
    that all allow everything. At temperature 0 a walked row's decision is known once walked, so its row
    allows just that token: the decisions take the same token as under the full mask, and applying it
    costs no unpacking of bitmasks."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: np.ndarray | None):
        self.tokens = tokens


class Scratch:
    """The arrays a step's grammar work writes, kept from step to step (a Decider owns one): fresh arrays
    of a step's size cost their page faults every step. Views of them are valid until the next step."""

    def __init__(self):
        self._masks = np.empty((0, 0), dtype=np.int32)
        self._forced = self._picked = np.empty(0, dtype=np.int64)

    def arrays(self, rows: int, words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bitmask rows [rows, words], forced tokens (all -1) and picked tokens [rows] (contents undefined)."""
        if self._masks.shape[1] != words or len(self._masks) < rows:
            self._masks = np.empty((max(rows, 2 * len(self._masks)), words), dtype=np.int32)
        if len(self._forced) < rows:
            size = max(rows, 2 * len(self._forced))
            self._forced, self._picked = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
        forced = self._forced[:rows]
        forced.fill(-1)
        return self._masks[:rows], forced, self._picked[:rows]


class StepRows:
    """What a step's grammar work gives the decisions: `masks`, (first logit row, bitmask rows) per MASKS job;
    `rows` and `tokens`, every other guided logit row that allows a single token, and that token. Iterated:
    each job's rows as one request sees them (bitmask rows, or OnlyTokens)."""

    def __init__(self, jobs: list[tuple[int, GuideJob]], out: np.ndarray, forced: np.ndarray, listed: bool = True):
        """listed: find the one-token rows (False: none are left to apply; the native walk applied them)."""
        self._jobs, self._out, self._forced = jobs, out, forced
        self.masks = [(first, self._job_masks(job)) for first, job in jobs if job.kind == MASKS]
        self.rows = self.tokens = np.zeros(0, dtype=np.int64)
        if listed:
            counts = [job.count for _, job in jobs]
            shift = np.repeat(np.array([first - job.base for first, job in jobs], dtype=np.int64), counts)
            chosen = np.flatnonzero(forced >= 0)
            self.rows, self.tokens = chosen + shift[chosen], forced[chosen]

    def _job_masks(self, job: GuideJob) -> np.ndarray:
        return np.full((job.count, 1), -1, dtype=np.int32) if job.failed else self._out[job.base: job.base + job.count]

    def __iter__(self):
        for _, job in self._jobs:
            if job.kind == MASKS:
                yield self._job_masks(job)
            else:
                tokens = self._forced[job.base: job.base + job.count]
                yield OnlyTokens(tokens.copy() if (tokens >= 0).any() else None)
