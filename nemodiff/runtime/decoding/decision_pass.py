"""One batched decision pass per step: every request's token choices, on the logits' device.

checkpoint ──builder──▶ engine dir ──[runtime: model ▶ decide ▶ strategies]──▶ Triton

After the forward, each strategy registers what it needs from its logit rows (a sampled
token, draft tokens, denoising candidates, a speculative verification, a QuadraticSpec
cycle). `Decider.run` then computes each kind of need for all requests at once with a few
tensor operations, packs every answer into one int64 tensor and copies it to the host once:
the only device-to-host transfer of a step. Strategies read their answers as numpy slices.
On a CPU device the logits already are host memory: needs whose requests all decode greedily
are then decided in numpy on views of them (`decision_pass_numpy.py`), which costs a fraction of the
tensor operations' dispatch, and the answers are packed into one numpy array.

Drafts sampled at temperature > 0 keep their distributions (`strategy.draft_probs`) on the
device for the rejection sampling of the next verification.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from nemodiff.device import Platform, as_platform
from nemodiff.runtime.model.segments import arange

from . import batched_sampling as S
from .bias import RowAdjustments
from .grammar import apply_masks, apply_only
from .grammar_batch import run_jobs
from .grammar_jobs import GuideJob, Scratch
from .logprobs import LogprobPass, TokenLogprob


class _Needs:
    """The needs of one kind, in registration order. Registration appends one tuple per need;
    `unpack` then gives the columns: strategies, rows (first logit row), counts (logit rows),
    extra (kind-specific values) and handles."""

    def __init__(self):
        self.items: list[tuple] = []
        self.sampled = False  # some request samples (temperature > 0)

    def unpack(self) -> None:
        self.strategies, self.rows, self.counts, self.extra, self.handles = zip(*self.items)

    def cover(self, num_rows: int) -> bool:
        """Whether the needs' rows are all of the step's `num_rows` logit rows, in order. (Needs hold
        disjoint row ranges registered in row order: starting at row 0 and counting every row, they
        are all of them.)"""
        return self.rows[0] == 0 and sum(self.counts) == num_rows


log = logging.getLogger(__name__)
KINDS = ("sample", "drafts", "candidates", "verify", "quad")
NO_ROWS = np.zeros(0, dtype=np.int64)


class Decider:
    def __init__(self, device: torch.device | Platform, mask_token_id: int, host_arrays: bool = True):
        """host_arrays: on the CPU reference path, decide greedy needs in numpy (False: always with tensors)."""
        self.platform = as_platform(device)
        self.device = self.platform.device
        self.mask_id = mask_token_id
        self.host_arrays = host_arrays and self.platform.host_decisions
        self._copy = self.platform.host_copy()  # the step's one device-to-host copy
        self._grammar_scratch = Scratch()  # the grammar work's arrays, reused step after step
        self.begin()

    def begin(self) -> None:
        self._needs: dict[str, _Needs] = {}  # by kind, made on first use
        self._num_handles = 0
        self._starts = self._ends = None  # per handle: where its answer lies in the packed result
        self._host: np.ndarray | None = None
        self.logprob_pass: LogprobPass | None = None  # made when a request asks for log-probabilities
        self._guides: list[tuple[int, object]] = []  # (first row, bitmask rows): grammar masks (grammar.py)
        self._shapers: list[tuple[int, int, object]] = []  # (first row, count, fn): masks built from the rows
        self._adjust = RowAdjustments()  # logit bias and min-token masks (bias.py)

    # -- registration (host, O(1) per request) -----------------------------------------------
    def _register(self, kind: str, strategy, first_row: int, count: int, extra=None) -> int:
        handle = self._num_handles
        self._num_handles += 1
        needs = self._needs.get(kind)
        if needs is None:
            needs = self._needs[kind] = _Needs()
        needs.items.append((strategy, first_row, count, extra, handle))
        if strategy.params.temperature > 0:
            needs.sampled = True
        strategy.draw_counter += 1
        return handle

    def sample(self, strategy, row: int) -> int:
        """One token from one logit row (greedy, or sampled with the request's settings)."""
        return self._register("sample", strategy, row, 1)

    def drafts(self, strategy, first_row: int, count: int) -> int:
        """A draft token per row; at temperature > 0 their distributions go to strategy.draft_probs."""
        return self._register("drafts", strategy, first_row, count)

    def candidates(self, strategy, first_row: int, count: int, lanes: np.ndarray, threshold: float | None,
                   topk: int, last_step: bool, skip_mask: bool) -> int:
        """Denoising: per row the token to write now, or what marks it still masked: the mask id
        when skip_mask (the mask id is never written), else -1 (see `decision_kinds.run_candidates`)."""
        return self._register("candidates", strategy, first_row, count, (lanes, threshold, topk, last_step, skip_mask))

    def verify(self, strategy, first_row: int, count: int, token_row: int) -> int:
        """Rows a_0..a_{m-1} against the drafts at batch token rows token_row+1..: (n, tokens...)."""
        return self._register("verify", strategy, first_row, count, token_row)

    def quad(self, strategy, first_row: int, k: int, token_row: int) -> int:
        """A QuadraticSpec cycle: (n, tokens[k], next drafts[k-1])."""
        return self._register("quad", strategy, first_row, k, token_row)

    def logprobs(self, strategy, first_row: int, count: int, answer: int, offset: int = 0) -> int:
        """Log-probabilities of the tokens decided for rows first_row..first_row+count-1 (row i's token is
        entry offset+i of `answer`'s answer) and the request's top alternatives (logprobs.py)."""
        if self.logprob_pass is None:
            self.logprob_pass = LogprobPass()
        return self.logprob_pass.ask(first_row, count, answer, offset, strategy.params.logprobs or 0)

    def logprob_result(self, handle: int, tokens: list[int]) -> list[TokenLogprob]:
        return self.logprob_pass.result(handle, tokens)

    def adjust(self, strategy, first_row: int, indices: np.ndarray, drafts=None, depths=None) -> None:
        """The request's penalties, logit bias and min-token masks for the rows from first_row, where row i
        decides output index indices[i] after the output and drafts[:depths[i]] (bias.py); before the grammar
        masks and every decision."""
        self._adjust.add(strategy, first_row, indices, drafts, depths)

    def constrain(self, first_row: int, bitmask: np.ndarray) -> None:
        """Grammar masks (int32 bitmask rows, grammar.py) for the logit rows from first_row: the
        decisions of this step see -inf at every disallowed token."""
        self._guides.append((first_row, bitmask))

    def shape(self, first_row: int, count: int, fn) -> None:
        """Grammar masks that depend on the rows' own logits (tokens built left to right): before any
        decision, fn(rows) returns the bitmask rows of rows first_row..first_row+count-1, where rows(i, j)
        copies rows first_row+i..first_row+j-1 to the host (float32; only those it asks for). fn may be a
        grammar_batch.GuideJob instead: the step's jobs then run together, in lockstep."""
        self._shapers.append((first_row, count, fn))

    def _apply_guides(self, logits: torch.Tensor):
        """Mask the guided rows in place; returns what restores them for the log-probabilities (raw)."""
        jobs = [(first, fn) for first, _, fn in self._shapers if isinstance(fn, GuideJob)]
        only = None  # grammar_batch.py StepRows: the rows that allow one token each
        if jobs:  # the step's grammar work, all requests at once (grammar_batch.py)
            try:
                only = run_jobs(jobs, logits, scratch=self._grammar_scratch, apply=self.logprob_pass is None)
                self._guides += only.masks
            except Exception:  # xgrammar itself failed: these rows unmasked, their next tokens fail their checks
                log.exception("the grammar masks failed; their rows are left unmasked")
        for first, count, fn in self._shapers:
            if isinstance(fn, GuideJob):
                continue
            try:
                bitmask = fn(lambda i, j, f=first: logits[f + i: f + j].float().cpu())
            except Exception:  # that request alone: unmasked, its next token fails its grammar check
                log.exception("a grammar mask failed; its rows are left unmasked")
                bitmask = np.full((count, 1), -1, dtype=np.int32)
            self._guides.append((first, bitmask))
        keep = self.logprob_pass is not None
        restores = []
        if only is not None and len(only.rows):
            restores.append((only.rows, apply_only(logits, only.rows, only.tokens, keep)))
        if self._guides:
            rows = np.concatenate([np.arange(f, f + len(b), dtype=np.int64) for f, b in self._guides])
            width = max(b.shape[1] for _, b in self._guides)
            bitmask = np.concatenate([b if b.shape[1] == width else np.full((len(b), width), -1, np.int32)
                                      for _, b in self._guides])
            masked = (bitmask != -1).any(axis=1)  # rows that allow everything are left alone
            if not masked.all():
                rows, bitmask = rows[masked], bitmask[masked]
            if len(rows):
                restores.append((rows, apply_masks(logits, rows, bitmask, keep=keep)))
        if not keep or not restores:
            return None
        if len(restores) == 1:
            return restores[0]
        return np.concatenate([r for r, _ in restores]), torch.cat([o for _, o in restores])

    # -- device work -------------------------------------------------------------------------
    def run(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Compute every registered need; the answers stay on the device until `fetch`.

        Every logit row's greedy token is found once, in one pass, and the kinds share it. Each
        row is also flagged by whether its largest value is finite (a NaN or +inf anywhere in a
        row, or a row of -inf, shows there): the packed result starts with the flags on a device.
        On the host path the rows that fail are kept apart, and the pass over every row runs on
        first use (`all_greedy`): steady QuadraticSpec steps read only their target rows and the
        accepted group's, and check those."""
        raw = self._adjust.apply(logits, keep=self.logprob_pass is not None) if self._adjust else None
        restore = self._apply_guides(logits) if self._guides or self._shapers else None
        host = self.host_arrays and logits.dtype in (torch.float32, torch.float64)
        if host:  # numpy views of the CPU tensors
            x, host_ids = logits.numpy(), ids.numpy()
            self._x, self.greedy_host, self.greedy_flat, self._bad_parts = x, None, None, []
            parts: list = []
        else:
            self.greedy = S.row_argmax(logits)
            parts = [logits.gather(1, self.greedy[:, None])[:, 0].isfinite().to(torch.int64)]
        self._host_parts = host
        self._finite_len = 0 if host else logits.shape[0]
        self._starts, self._ends = [0] * self._num_handles, [0] * self._num_handles
        self._placed = self._finite_len
        for kind in KINDS:
            needs = self._needs.get(kind)
            if needs is None:
                continue
            needs.unpack()
            if host and not needs.sampled:
                HOST_RUNNERS[kind](self, needs, x, host_ids, parts)
            else:
                if host:
                    self.greedy = torch.from_numpy(self.all_greedy())
                RUNNERS[kind](self, needs, logits, ids, parts)
        if host:
            self._packed = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else NO_ROWS
        else:
            self._packed = torch.cat(parts)
        if restore is not None:  # log-probabilities are taken before any grammar mask
            logits[torch.from_numpy(restore[0]).to(logits.device)] = restore[1]
        if raw is not None:  # and before any bias
            logits[raw[0]] = raw[1]
        if self.logprob_pass is not None:  # after the decisions: their tokens are what it scores
            extra = self.logprob_pass.run(logits, self._packed, self._starts, len(self._packed))
            self._packed = np.concatenate([self._packed, extra.numpy()]) if host else torch.cat([self._packed, extra])

    def all_greedy(self) -> np.ndarray:
        """Host path: every logit row's greedy token, found in one pass on first use, which also
        checks every row's largest value."""
        if self.greedy_host is None:
            x = self._x
            self.greedy_host = x.argmax(axis=-1).astype(np.int64, copy=False)
            self.greedy_flat = self.check_rows(arange(len(x)), self.greedy_host)
        return self.greedy_host

    def check_rows(self, rows: np.ndarray, greedy: np.ndarray) -> np.ndarray:
        """Host path: remember the rows (flat int64) whose value at their greedy token is not finite.
        Returns where those values lie in the flattened logits."""
        flat = rows * self._x.shape[1] + greedy
        finite = np.isfinite(self._x.reshape(-1)[flat])
        if not finite.all():
            self._bad_parts.append(rows[~finite])
        return flat

    def fetch(self) -> None:
        """The step's one device-to-host copy."""
        packed = self._packed
        if isinstance(packed, np.ndarray):
            self._host = packed
        else:
            self._host = self._copy.fetch(packed)
        self._mask_flags = None
        if self.logprob_pass is not None:
            self.logprob_pass.read(self._host)

    def bad_rows(self) -> np.ndarray:
        """Logit rows whose largest value is not finite (a NaN or +inf in the row, or only -inf): every
        row on a device; on the host path, every row the decisions read."""
        if self._host_parts:
            return np.concatenate(self._bad_parts) if self._bad_parts else NO_ROWS
        return np.flatnonzero(self._host[: self._finite_len] == 0)

    def result(self, handle: int) -> np.ndarray:
        return self._host[self._starts[handle]: self._ends[handle]]

    def is_mask(self, handle: int) -> np.ndarray:
        """Which entries of the handle's answer are the mask id (one comparison for the whole step)."""
        if self._mask_flags is None:
            self._mask_flags = self._host == self.mask_id
        return self._mask_flags[self._starts[handle]: self._ends[handle]]

    # -- helpers -----------------------------------------------------------------------------
    def place(self, parts: list, handles: list[int], values, sizes) -> None:
        """Append `values` (the handles' answers, flattened in order; a tensor, or a numpy array on
        the host path); sizes: each answer's length (an int when they are all equal)."""
        placed, starts, ends = self._placed, self._starts, self._ends
        if isinstance(sizes, (int, np.integer)):
            for i, handle in enumerate(handles):
                starts[handle] = placed + i * sizes
                ends[handle] = placed + (i + 1) * sizes
        else:
            for handle, end in zip(handles, (np.cumsum(sizes) + placed).tolist()):
                starts[handle], ends[handle] = placed, end
                placed = end
        if self._host_parts:
            if isinstance(values, torch.Tensor):
                values = values.numpy()
            values = values.reshape(-1).astype(np.int64, copy=False)
        else:
            values = values.reshape(-1).to(torch.int64)
        self._placed += len(values)
        parts.append(values)

    def index(self, values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64)).to(self.device, non_blocking=True)

    def gather(self, logits: torch.Tensor, needs: _Needs) -> tuple[torch.Tensor, torch.Tensor]:
        """The needs' logit rows, in order, and their greedy tokens (no copy when they are all of
        the logits, in order)."""
        if needs.cover(logits.shape[0]):
            return logits, self.greedy
        index = self.index(self.rows(needs))
        return logits[index], self.greedy[index]

    @staticmethod
    def rows(needs: _Needs) -> np.ndarray:
        """Every need's logit rows, concatenated."""
        starts = np.asarray(needs.rows, dtype=np.int64)
        if all(c == 1 for c in needs.counts):
            return starts
        counts = np.asarray(needs.counts, dtype=np.int64)
        return np.repeat(starts, counts) + within(counts)

    def params(self, strategies: list, per_row: np.ndarray | None = None):
        """temperature, top_k, top_p, seed, counter tensors for these strategies (repeated per row)."""
        temps = np.array([s.params.temperature for s in strategies], dtype=np.float64)
        top_k = np.array([s.params.top_k for s in strategies], dtype=np.int64)
        top_p = np.array([s.params.top_p for s in strategies], dtype=np.float64)
        seeds = np.array([s.seed for s in strategies], dtype=np.int64)
        counters = np.array([s.draw_counter for s in strategies], dtype=np.int64)
        use_k, use_p = bool((top_k > 0).any()), bool((top_p < 1).any())
        if per_row is not None:
            temps, top_k, top_p, seeds, counters = (np.repeat(a, per_row) for a in
                                                    (temps, top_k, top_p, seeds, counters))
        dev = self.device
        return (torch.from_numpy(temps).to(dev), torch.from_numpy(top_k).to(dev), torch.from_numpy(top_p).to(dev),
                torch.from_numpy(seeds).to(dev), torch.from_numpy(counters).to(dev), use_k, use_p)

    def choose(self, rows, greedy_tokens: torch.Tensor, strategies: list, counts: np.ndarray, stream: int,
               keep_probs: bool = False) -> torch.Tensor:
        """A token per row: the greedy token for greedy requests, a sample for the others (lane = row
        in request). rows: a callable giving the logit rows, asked for only when someone samples."""
        greedy = np.array([s.params.temperature <= 0 for s in strategies])
        if greedy.all():
            return greedy_tokens
        logits = rows()
        row_greedy = np.repeat(greedy, counts)
        tokens = greedy_tokens.clone()
        sampled = [s for s, g in zip(strategies, greedy) if not g]
        hot_counts = counts[~greedy]
        hot_rows = self.index(np.flatnonzero(~row_greedy))
        temps, top_k, top_p, seeds, counters, use_k, use_p = self.params(sampled, hot_counts)
        probs = S.distribution_rows(logits[hot_rows], temps, top_k, top_p, use_k, use_p)
        lanes = self.index(np.concatenate([np.arange(c) for c in hot_counts]))
        u = S.uniform(seeds, counters, stream, lanes[:, None])[:, 0]
        tokens[hot_rows] = S.inverse_cdf(probs, u)
        if keep_probs:
            start = 0
            for s, c in zip(sampled, hot_counts):
                s.draft_probs = probs[start: start + c]
                start += c
        return tokens

    # -- the kinds ---------------------------------------------------------------------------
    def _run_sample(self, needs: _Needs, logits, ids, parts) -> None:
        count = len(needs.rows)
        x, greedy = self.gather(logits, needs)
        tokens = self.choose(lambda: x, greedy, needs.strategies, np.ones(count, dtype=np.int64), S.STREAM_SAMPLE)
        self.place(parts, needs.handles, tokens, 1)

    def _run_drafts(self, needs: _Needs, logits, ids, parts) -> None:
        counts = np.asarray(needs.counts, dtype=np.int64)
        x, greedy = self.gather(logits, needs)
        tokens = self.choose(lambda: x, greedy, needs.strategies, counts, S.STREAM_DRAFT, keep_probs=True)
        self.place(parts, needs.handles, tokens, counts)


from .decision_kinds import run_candidates, run_quad, run_verify, within  # noqa: E402
from .decision_pass_numpy import HOST_RUNNERS  # noqa: E402  (they build on Decider's helpers)

RUNNERS = {"sample": Decider._run_sample, "drafts": Decider._run_drafts, "candidates": run_candidates,
           "verify": run_verify, "quad": run_quad}
