"""Structured output, batched: the grammar work of every guided request of a step, together.

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ grammar masks of the whole step]──▶ Triton

A strategy describes its grammar work of a step as a `GuideJob` (grammar_jobs.py: a matcher, its logit
rows, and what they decide) and hands it to `Decider.shape`; before any decision `run_jobs` does the
step's jobs together. The kinds:

- MASKS: rows i = 0..len(drafts): the mask after the output and drafts[:i] (no logits read). Sampled
  rows need the full mask: their distribution is the masked one.
- VERIFY (temperature 0): row i decides after the output and drafts[:i]; the walk stops at the first
  row whose choice is not drafts[i] (the rows after it decide nothing that is kept).
- WALK (temperature 0): tokens built left to right (drafts, a QuadraticSpec group).
- DIFFUSE: a denoising step under the grammar (strategies/diffusion.py: reveal left to right while
  confident). Its rows come back as one-token rows: each revealed row allows its token, the rest the mask id.

How: a greedy row whose own first maximum the grammar takes (one `accept_token`) decides that token with
or without a mask, so at temperature 0 each job walks its rows on its own in a tight loop of try-accepts
and stops only where its greedy token is refused (or where the decision needs the masked distribution: a
denoising row's confidence, a sampled row, a MASKS row). Over float32 host logits the greedy jobs walk in
C++, all in one call (grammar_native.py); the others walk here in rounds: the stopped jobs of a round get
their bitmasks in one C++ call (xgrammar's `BatchGrammarMatcher`), their masked choices in one numpy pass,
and walk on in the next round, so the Python work grows with the rows walked and the rounds, not with
requests times rows. A try-accepted row stays all ones (no bitmask filled or applied); a VERIFY or WALK row
that needed its mask comes back allowing just the token it decided. Before `run_jobs` returns, every
job's look-ahead is rolled back but what its matcher keeps (grammar.py `ahead`: the `after` tokens, and a
verification's or denoising step's own decided tokens).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from nemodiff.device import on_host

from . import grammar_native
from .grammar_jobs import DIFFUSE, MASKS, VERIFY, WALK, GuideJob, Scratch, StepRows
from .grammar_reveal import confidences, reveal, samples

log = logging.getLogger(__name__)
_NEG = np.float32(-np.inf)


class _Host:
    """The logit rows on the host: the greedy token of the rows a walk may visit (one pass), and rows'
    values when asked; forced: per output row, the token a VERIFY or WALK row decided under its mask (-1:
    none, the row allows everything)."""

    def __init__(self, logits: torch.Tensor, forced: np.ndarray):
        self.logits, self.forced = logits, forced
        host = on_host(logits) and logits.dtype == torch.float32 and logits.is_contiguous()
        self.numpy = logits.numpy() if host else None
        self.greedy_list: list[int] | None = None

    def greedy(self, jobs: list[GuideJob]) -> None:
        """Find the first maximum of the rows these jobs may walk, into `greedy_list` (logit row -> token;
        on a device every row at the first call: one argmax there)."""
        x = self.numpy
        if x is None:
            if self.greedy_list is None:
                self.greedy_list = self.logits.argmax(dim=1).cpu().tolist()
            return
        if self.greedy_list is None:
            self.greedy_list = [0] * len(x)
        greedy = self.greedy_list
        for job in jobs:  # a slice per job: a view of the logits, no gathered copy
            start, end = job.row + job.depth, job.row + _greedy_end(job)
            greedy[start:end] = x[start:end].argmax(axis=1).tolist()

    def values(self, rows: np.ndarray) -> np.ndarray:
        """The rows' values (a copy)."""
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


def _masked(values: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """values [rows, vocab] (a copy: changed in place) with -inf where bitmask [rows, words] int32 refuses."""
    allowed = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, count=values.shape[1],
                            bitorder="little").view(bool)
    np.copyto(values, _NEG, where=~allowed)
    return values


def run_jobs(jobs: list[tuple[int, GuideJob]], logits: torch.Tensor, native: bool = True,
             scratch: Scratch | None = None, apply: bool = False) -> StepRows:
    """The step's guided rows (StepRows); a job that fails leaves its rows all ones (its request alone: the
    next token then fails its grammar check). native: greedy jobs over float32 host logits walk in
    grammar_native.py's C++ walk where it is available (the same decisions; False: every job in Python).
    scratch: arrays kept between steps (the results are views of them, valid until its next use). apply:
    the native walk may leave its one-token rows in the logits itself (StepRows then lists only the others)."""
    words = total = 0
    for _, job in jobs:
        words, total = max(words, job.guide.words), total + job.count
    out, forced, picked = (scratch or Scratch()).arrays(total, words)
    host = _Host(logits, forced)
    function = grammar_native.walker() if native and host.numpy is not None else None
    never, takes = jobs[0][1].guide._never if jobs else None, grammar_native.takes
    base, mine, rest = 0, [], []
    for first, job in jobs:
        job.base, job.row = base, first
        base += job.count
        guide = job.guide
        if job.after or guide.ahead:  # what the matcher keeps from the last step stays accepted
            job.after = job.after[guide.unwind(job.after):]
        if job.kind == MASKS:
            out[job.base: job.base + job.count] = -1  # rows after the walk allow everything
        (mine if function is not None and takes(job) and guide._never is never else rest).append(job)
    if mine:  # natively, with their follow-ups; they stand after their ahead again
        grammar_native.walk(function, mine, logits, out, forced, picked, apply)
    try:
        _walk(rest, out, host)
    finally:
        _rollback(rest)
    for job in rest:
        if job.failed:
            forced[job.base: job.base + job.count] = -1
        elif job.only is not None and job.picks:  # a denoising step: its revealed rows, then the mask id
            forced[job.base: job.base + job.count] = job.only
            forced[job.base: job.base + len(job.picks)] = job.picks
    return StepRows(jobs, out, forced, listed=not apply or bool(rest))


def _follow_ups(jobs: list[GuideJob]) -> list[GuideJob]:
    """The jobs' follow-ups (`then`), standing on their parents' look-ahead (rolled back with the root's)."""
    more = []
    for job in jobs:
        then, job.then = job.then, None
        if then is None or job.root.failed or not job.picks or job.guide.handle.is_terminated():
            continue
        offset = then.first + (len(job.picks) - 1) * then.stride
        if offset + then.count > job.root.base + job.root.count - job.base:
            log.error("a grammar follow-up reaches past its request's rows; they are left unmasked")
            job.root.failed = True
            continue
        child = GuideJob(job.guide, then.count, WALK, walk=then.walk)
        child.root, child.base, child.row = job.root, job.base + offset, job.row + offset
        more.append(child)
    return more


def _start(job: GuideJob) -> bool:
    """Accept the job's `after` tokens; False when one is refused or the grammar ended (rows stay all ones)."""
    guide = job.guide
    handle = guide.handle
    if handle.is_terminated():
        return False
    job.accept, job.never, job.stops = handle.accept_token, guide._never, guide.stops
    if not job.after:
        return True
    never, accept, size, stops = job.never, job.accept, len(job.never), job.stops
    for token in job.after:
        if not 0 <= token < size or never[token] or not accept(token, False):
            return False
        job.settled += 1
        if token in stops:
            return False
    return True


def _begin(jobs: list[GuideJob], host: _Host) -> list[GuideJob]:
    """The jobs that start (their greedy rows found); the follow-ups of those that cannot, begun too."""
    going, idle = [], []
    for job in jobs:
        (going if _start(job) else idle).append(job)
    host.greedy([job for job in going if _reads_greedy(job)])
    if idle:
        going += _begin(_follow_ups(idle), host)
    return going


def _walk(jobs: list[GuideJob], out: np.ndarray, host: _Host) -> None:
    """Rounds: every job walks its try-accepted rows; the jobs that stopped at a row needing its mask get
    their masks in one batched fill and their choices in one pass, and go on in the next round. A job
    whose walk ends hands over to its follow-up at once (it walks from the next round)."""
    if not jobs:
        return
    fill = _batch()[0]
    going = _begin(jobs, host)
    while going:
        stuck, done = [], []
        greedy = host.greedy_list
        for job in going:
            (stuck if _try_walk(job, greedy) else done).append(job)
        going = []
        if stuck:
            fill.batch_fill_next_token_bitmask([job.guide.handle for job in stuck], out,
                                               [job.base + job.depth for job in stuck], False)
            going = _decide_filled(stuck, out, host)
            if len(going) < len(stuck):
                on = {id(job) for job in going}
                done += [job for job in stuck if id(job) not in on]
        if any(job.then is not None for job in done):
            going += _begin(_follow_ups(done), host)


def _greedy_end(job: GuideJob) -> int:
    """The end of the rows whose greedy token the job may read (a denoising step by confidence: its first)."""
    d = job.diffuse
    return job.depth + 1 if d is not None and d.by_confidence else job.walk


def _reads_greedy(job: GuideJob) -> bool:
    """Whether the job's rows are greedy decisions that try-accept can take (the rest always fill)."""
    d = job.diffuse
    return job.kind != MASKS and (d is None or d.temperature <= 0)


def _try_walk(job: GuideJob, greedy: list[int]) -> bool:
    """Walk the job's rows while each row's greedy token is its decision and the grammar takes it; True
    when it stopped at a row that needs its mask (job.depth), False when its walk is over."""
    j, walk = job.depth, job.walk
    if j >= walk:
        return False
    kind, d = job.kind, job.diffuse
    if kind == MASKS or (d is not None and d.temperature > 0):
        return True  # every row's decision reads the masked distribution (or, MASKS, the mask itself)
    root, never, stops, accept = job.root, job.never, job.stops, job.accept
    size = len(never)
    drafts = job.drafts if kind == VERIFY else None
    confidence = d is not None and d.by_confidence  # rows after the first: their masked confidence
    row, picks = job.row, job.picks
    while j < walk:
        if d is not None and j and not d.last and (confidence or j >= d.k):
            if confidence:
                break
            job.depth = walk  # top-k schedule: this step reveals no more
            return False
        token = greedy[row + j]
        if token >= size or never[token] or not accept(token, False):
            break
        root.taken += 1
        picks.append(token)
        j += 1
        if token in stops or (drafts is not None and (j > len(drafts) or token != drafts[j - 1])):
            job.depth = walk  # the grammar ended, or the verification's first mismatch (its bonus token)
            return False
    job.depth = j
    return j < walk


def _decide_filled(jobs: list[GuideJob], out: np.ndarray, host: _Host) -> list[GuideJob]:
    """The tokens of rows whose masks were just filled (MASKS: the draft; greedy: the masked first
    maximum, in one numpy pass; DIFFUSE: its rule), accepted; returns the jobs that walk on."""
    chosen: list[tuple[GuideJob, int]] = []
    looks = [job for job in jobs if job.kind != MASKS]
    if looks:
        masked = _masked(host.values(np.array([job.row + job.depth for job in looks], dtype=np.int64)),
                         out[[job.base + job.depth for job in looks]])
        best = masked.argmax(axis=1)
        ask = [i for i, job in enumerate(looks) if job.depth and job.diffuse is not None and job.diffuse.by_confidence]
        confidence = confidences(masked[ask], best[ask]) if ask else None
        drawn = [i for i, job in enumerate(looks) if job.diffuse is not None and job.diffuse.draw is not None]
        drawn_tokens = dict(zip(drawn, samples(masked[drawn], [looks[i].diffuse for i in drawn],
                                               [looks[i].depth for i in drawn]))) if drawn else {}
        best = best.tolist()
        for i, job in enumerate(looks):
            if job.diffuse is None:
                token = best[i]
                host.forced[job.base + job.depth] = token
            else:
                token = reveal(job.diffuse, job.depth, best[i], confidence, ask, i, drawn_tokens.get(i))
            if token is not None:
                chosen.append((job, token))
    for job in jobs:
        if job.kind == MASKS and job.depth < len(job.drafts):
            token = int(job.drafts[job.depth])
            if 0 <= token < len(job.never) and not job.never[token]:  # else refused: the walk ends here
                chosen.append((job, token))
    going = []
    for job, token in chosen:
        if not job.guide.handle.accept_token(token, False):
            continue
        job.root.taken += 1
        job.picks.append(token)
        j = job.depth
        job.depth = j + 1
        if token in job.guide.stops or (job.kind != WALK and job.kind != DIFFUSE
                                        and (j >= len(job.drafts) or token != job.drafts[j])):
            continue  # the grammar ended, or a verification's first mismatch (its bonus token)
        going.append(job)
    return going


def _rollback(jobs: list[GuideJob]) -> None:
    """Undo the look-ahead but what the matchers keep (their `ahead`): each job's accepted `after` tokens
    and, for a verification or a denoising step that did not fail, the tokens its own rows decided (the
    output the step commits, or the block's next `after`). A follow-up's tokens count on its root job and
    were accepted last."""
    handles, counts = [], []
    for job in jobs:
        keep = job.picks if job.kind in (VERIFY, DIFFUSE) and not job.failed else []
        job.guide.ahead += job.after[: job.settled] + keep
        if job.taken > len(keep):
            handles.append(job.guide.handle)
            counts.append(job.taken - len(keep))
    if handles:
        _batch()[1].batch_rollback(handles, counts)
