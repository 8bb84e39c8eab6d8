"""Structured output, batched: the grammar work of every guided request of a step, in lockstep.

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ grammar masks of the whole step]──▶ Triton

A strategy describes its grammar work of a step as a `GuideJob` (grammar.py's matcher, its logit rows,
and what they decide) and hands it to `Decider.shape`; before any decision `run_jobs` does the step's
jobs together, row index by row index: at each depth one C++ call fills the bitmasks of every job
that needs one (xgrammar's `BatchGrammarMatcher`), one accepts every job's token, and the masked
greedy choices are one numpy pass, so the Python work per step grows with the rows walked, not with
requests times rows. The kinds:

- MASKS: rows i = 0..len(drafts): the mask after the output and drafts[:i] (no logits read). Sampled
  rows need the full mask: their distribution is the masked one.
- VERIFY (temperature 0): row i decides after the output and drafts[:i]; the walk stops at the first
  row whose choice is not drafts[i] (the rows after it decide nothing that is kept).
- WALK (temperature 0): tokens built left to right (drafts, a QuadraticSpec group).
- DIFFUSE: a denoising step under the grammar (strategies/diffusion.py: reveal left to right while
  confident).

Try-accept before fill: a greedy row whose own first maximum the grammar takes (one `accept_token`,
undone at the end with every look-ahead) decides that token with or without a mask, so the row stays
all ones and no bitmask is filled or applied for it; only rows whose greedy token the grammar refuses
are filled and masked. Every job's look-ahead is rolled back before `run_jobs` returns: matchers
stand after their request's output, as grammar.py promises.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from nemodiff.device import on_host

from .grammar import GuideMatcher

log = logging.getLogger(__name__)
MASKS, VERIFY, WALK, DIFFUSE = "masks", "verify", "walk", "diffuse"
_NEG = np.float32(-np.inf)


class Diffuse:
    """How a DIFFUSE job reveals (strategies/diffusion.py `_guided_step`): tau (confidence threshold) or
    k (top-k schedule: the step reveals up to k), last (the block's last step: reveal every walked row),
    temperature and the step's generator (temperature > 0)."""

    __slots__ = ("tau", "k", "last", "temperature", "generator")

    def __init__(self, tau: float | None, k: int, last: bool, temperature: float, generator=None):
        self.tau, self.k, self.last, self.temperature, self.generator = tau, k, last, temperature, generator


class GuideJob:
    """One request's grammar work of a step: `count` logit rows from the first row it is registered at.
    after: tokens standing before row 0 (accepted first); drafts: MASKS and VERIFY rows' look-ahead;
    walk: the most rows walked (default count); then(job) -> (offset, GuideJob) | None: work that depends
    on this job's result, on rows from `offset` (a QuadraticSpec group after the verified targets);
    finish(job) -> bitmask: the rows to apply, from the job's picks (default: the filled rows)."""

    __slots__ = ("guide", "count", "kind", "after", "drafts", "walk", "diffuse", "then", "finish", "picks",
                 "base", "row", "taken", "failed", "root")

    def __init__(self, guide: GuideMatcher, count: int, kind: str, after=(), drafts=(), walk: int | None = None,
                 diffuse: Diffuse | None = None, then=None, finish=None):
        self.guide, self.count, self.kind = guide, count, kind
        self.after, self.drafts = list(after), list(drafts)
        self.walk = count if walk is None else min(walk, count)
        if kind == MASKS:
            self.walk = min(self.walk, len(self.drafts) + 1)
        self.diffuse, self.then, self.finish = diffuse, then, finish
        self.picks: list[int] = []  # the token each walked row decided, in order
        self.base = self.row = self.taken = 0  # first output row, first logit row, tokens accepted (to roll back)
        self.failed = False
        self.root = self  # the job whose rows and look-ahead a follow-up shares


class _Host:
    """The logit rows on the host: every row's greedy token (one pass), and rows' values when asked."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.numpy = logits.numpy() if on_host(logits) and logits.dtype == torch.float32 else None
        self._greedy = None

    def greedy(self, rows: np.ndarray) -> np.ndarray:
        if self._greedy is None:
            x = self.numpy
            self._greedy = x.argmax(axis=1) if x is not None else self.logits.argmax(dim=1).cpu().numpy()
        return self._greedy[rows]

    def values(self, rows: np.ndarray) -> np.ndarray:
        if self.numpy is not None:
            return self.numpy[rows]
        return self.logits[torch.from_numpy(rows).to(self.logits.device)].float().cpu().numpy()


_BATCH = None


def _batch():
    global _BATCH
    if _BATCH is None:
        from xgrammar.matcher import _core  # the batched calls on cached matcher handles (no wrapper per call)

        _BATCH = (_core.BatchGrammarMatcher("auto"), _core.BatchGrammarMatcher)
    return _BATCH


def _unpack(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """[rows, words] int32 -> [rows, vocab] bool."""
    return np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(bool)


def run_jobs(jobs: list[tuple[int, GuideJob]], logits: torch.Tensor) -> list[np.ndarray]:
    """The bitmask rows of each (first logit row, job), in order; a job that fails leaves its rows all ones
    (its request alone: the next token then fails its grammar check)."""
    words = max(job.guide.words for _, job in jobs)
    out = np.full((sum(job.count for _, job in jobs), words), -1, dtype=np.int32)
    base = 0
    for first, job in jobs:
        job.base, job.row = base, first
        base += job.count
    host = _Host(logits)
    todo = [job for _, job in jobs]
    try:
        while todo:
            _walk(todo, out, host)
            todo = _follow_ups(todo)
    finally:
        _rollback([job for _, job in jobs])
    results = []
    for _, job in jobs:
        rows = out[job.base: job.base + job.count]
        if not job.failed and job.finish is not None:
            try:
                rows = job.finish(job)
            except Exception:
                log.exception("a grammar mask failed; its rows are left unmasked")
                job.failed = True
        results.append(np.full((job.count, 1), -1, dtype=np.int32) if job.failed else rows)
    return results


def _follow_ups(jobs: list[GuideJob]) -> list[GuideJob]:
    """The jobs' follow-ups (`then`), standing on their parents' look-ahead (rolled back with the root's)."""
    more = []
    for job in jobs:
        then, job.then = job.then, None
        if then is None or job.root.failed:
            continue
        try:
            nxt = then(job)
        except Exception:
            log.exception("a grammar mask failed; its rows are left unmasked")
            job.root.failed = True
            continue
        if nxt is not None:
            offset, child = nxt
            child.guide, child.root = job.guide, job.root
            child.base, child.row = job.base + offset, job.row + offset
            more.append(child)
    return more


def _start(job: GuideJob) -> bool:
    """Accept the job's `after` tokens; False when one is refused or the grammar ended (rows stay all ones)."""
    guide = job.guide
    if guide.terminated:
        return False
    never, accept, size = guide._never, guide.handle.accept_token, len(guide._never)
    for token in job.after:
        if not 0 <= token < size or never[token] or not accept(token, False):
            return False
        job.root.taken += 1
        if token in guide.stops:
            return False
    return True


def _walk(jobs: list[GuideJob], out: np.ndarray, host: _Host) -> None:
    fill = _batch()[0]
    active = [job for job in jobs if _start(job)]
    j = 0
    while active:
        active = [job for job in active if j < job.walk]
        if not active:
            break
        looks = [job for job in active if job.kind != MASKS]
        filled = [job for job in active if job.kind == MASKS]
        tokens: dict[int, int] = {}
        if looks:
            rows = np.fromiter((job.row + j for job in looks), dtype=np.int64, count=len(looks))
            greedy = host.greedy(rows)
            tries, try_tokens = [], []
            confident = _confident(looks, j, rows, greedy, host)
            for job, token, sure in zip(looks, greedy.tolist(), confident):
                if sure and _known(job, j, token):
                    tries.append(job)
                    try_tokens.append(token)
                else:
                    filled.append(job)
            if tries:
                for job, token, ok in zip(tries, try_tokens, _accept(tries, try_tokens)):
                    if ok:
                        tokens[id(job)] = token
                        job.root.taken += 1
                    else:
                        filled.append(job)
        if filled:
            fill.batch_fill_next_token_bitmask([job.guide.handle for job in filled], out,
                                               [job.base + j for job in filled], False)
            chosen = _choose(filled, j, out, host)
            ok = _accept([job for job, _ in chosen], [t for _, t in chosen])
            for (job, token), took in zip(chosen, ok):
                if took:
                    tokens[id(job)] = token
                    job.root.taken += 1
        nxt = []
        for job in active:
            token = tokens.get(id(job))
            if token is None:
                continue
            job.picks.append(token)
            if token in job.guide.stops:  # the grammar ended
                continue
            if job.kind in (MASKS, VERIFY) and (j >= len(job.drafts) or token != job.drafts[j]):
                continue
            nxt.append(job)
        active = nxt
        j += 1


def _accept(jobs: list[GuideJob], tokens: list[int]) -> list[bool]:
    """Each job's matcher accepts its token (direct calls on the C++ handles: the batched call's result
    array costs more to read back than the calls themselves)."""
    return [job.guide.handle.accept_token(token, False) for job, token in zip(jobs, tokens)]


def _known(job: GuideJob, j: int, token: int) -> bool:
    """Whether the row's greedy token, if the grammar takes it, is the row's decision (try-accept first)."""
    never = job.guide._never
    if not 0 <= token < len(never) or never[token]:
        return False
    d = job.diffuse
    return d is None or d.temperature <= 0  # a sample comes from the masked distribution: always filled


def _confident(jobs: list[GuideJob], j: int, rows: np.ndarray, greedy: np.ndarray, host: _Host) -> list[bool]:
    """Per job: False where a denoising row's reveal depends on its masked confidence and the unmasked one
    (a lower bound: the mask only removes mass) is below the threshold, so the row must be filled."""
    ask = [i for i, job in enumerate(jobs) if job.diffuse is not None and j and not job.diffuse.last
           and job.diffuse.tau is not None and job.diffuse.temperature <= 0]
    sure = [True] * len(jobs)
    if ask:
        x = host.values(rows[ask]).astype(np.float64)
        top = x[np.arange(len(ask)), greedy[ask]]
        p = 1.0 / np.exp(x - top[:, None]).sum(axis=1)
        for i, prob in zip(ask, p.tolist()):
            sure[i] = prob >= jobs[i].diffuse.tau * (1 + 1e-9)
    return sure


def _choose(jobs: list[GuideJob], j: int, out: np.ndarray, host: _Host) -> list[tuple[GuideJob, int]]:
    """The tokens of filled rows (MASKS: the draft; greedy: the masked first maximum, in one numpy pass;
    DIFFUSE: its rule); a job that stops here is left out."""
    chosen = []
    looks = [job for job in jobs if job.kind != MASKS]
    if looks:
        rows = np.fromiter((job.row + j for job in looks), dtype=np.int64, count=len(looks))
        values = host.values(rows)
        bits = _unpack(out[[job.base + j for job in looks]], values.shape[1])
        masked = np.where(bits, values, _NEG)
        best = masked.argmax(axis=1)
        greedy_p = [1.0] * len(looks)
        ask = [i for i, job in enumerate(looks) if job.diffuse is not None and j and not job.diffuse.last
               and job.diffuse.tau is not None and job.diffuse.generator is None]
        if ask:  # the masked confidence of the greedy token, where a reveal depends on it: one pass
            rows_p = masked[ask].astype(np.float64)
            top = rows_p[np.arange(len(ask)), best[ask]]
            for i, prob in zip(ask, (1.0 / np.exp(rows_p - top[:, None]).sum(axis=1)).tolist()):
                greedy_p[i] = prob
        best = best.tolist()
        for i, job in enumerate(looks):
            token = best[i] if job.diffuse is None else _diffuse(job, j, masked[i], best[i], greedy_p[i])
            if token is not None:
                chosen.append((job, token))
    for job in jobs:
        if job.kind == MASKS and j < len(job.drafts):
            chosen.append((job, int(job.drafts[j])))
    return chosen


def _diffuse(job: GuideJob, j: int, row: np.ndarray, greedy: int, p: float) -> int | None:
    """A denoising row under its mask: the token to reveal, or None (stays masked; the walk ends). greedy,
    p: the masked row's first maximum and its renormalised probability (temperature 0)."""
    d = job.diffuse
    if d.generator is not None:  # temperature > 0: a sample from the masked distribution
        probs = torch.softmax(torch.from_numpy(row).double() / d.temperature, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=d.generator))
        p = float(probs[token])
    else:
        token = greedy
    if j == 0 or d.last or (p >= d.tau if d.tau is not None else j < d.k):
        return token
    return None


def _rollback(jobs: list[GuideJob]) -> None:
    """Undo every look-ahead (a follow-up's tokens count on its root job)."""
    taken = [job for job in jobs if job.taken]
    if taken:
        _batch()[1].batch_rollback([job.guide.handle for job in taken], [job.taken for job in taken])
