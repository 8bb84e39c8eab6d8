"""Greedy decisions on a CPU device, in numpy: the same answers as the tensor kinds, cheaper to run.

checkpoint ──builder──▶ engine dir ──[runtime: decide (CPU, greedy kinds)]──▶ strategies ──▶ Triton

When the logits live on the CPU the "device" is the host itself, and a PyTorch operation
costs several microseconds of dispatch whatever its size: the tensor version of a step's
decisions is dozens of them. For needs whose requests all decode greedily (temperature 0),
these functions compute the same answers with numpy on zero-copy views of the logits, laid
out the same way in the packed result (`Decider.place`). Sampled needs, and every need on a
GPU, go through the tensor kinds (`decision_pass.py`, `decision_kinds.py`); a test runs both on the
same logits and requires equal answers.

Ragged groups (requests with different row counts) are padded to the widest group.
"""

from __future__ import annotations

import numpy as np
import torch

from nemodiff.runtime.model.segments import arange

from . import batched_sampling as S
from .decision_kinds import REFINE_MARGIN, evenly_spaced, group_starts, padded_slots, rows_to_refine


def sample_or_drafts(d, needs, x: np.ndarray, ids: np.ndarray, parts: list) -> None:
    """A greedy token per row (kinds "sample" and "drafts")."""
    counts = np.asarray(needs.counts, dtype=np.int64)
    d.place(parts, needs.handles, d.all_greedy() if needs.cover(len(x)) else d.all_greedy()[d.rows(needs)], counts)


def candidates(d, needs, x: np.ndarray, ids: np.ndarray, parts: list) -> None:
    """Denoising selection (see `decision_kinds.run_candidates`), greedy requests only. The per-need
    settings are read as Python values, and one block (one request) takes scalar reductions."""
    extra, n = needs.extra, len(needs.counts)
    total = sum(needs.counts)
    cover = needs.cover(len(x))
    if cover:
        xs, cand = x, d.all_greedy()
    else:
        rows = d.rows(needs)
        xs, cand = x[rows], d.all_greedy()[rows]
    xt = torch.from_numpy(xs)
    probs = torch.softmax(xt, dim=-1).numpy()  # float32
    conf32 = probs.reshape(-1)[d.greedy_flat if cover else arange(total) * xs.shape[1] + cand]
    counts = np.asarray(needs.counts, dtype=np.int64)
    starts = None if n == 1 else np.asarray(needs.rows, dtype=np.int64) if cover else group_starts(counts)
    if n > 1:
        write = _usual_denoising(conf32, cand, counts, starts, extra, d.mask_id)
        if write is not None:
            _fill_last_step(d, xs, write, None, counts, [e[3] for e in extra])
            d.place(parts, needs.handles, write, counts)
            return
    thresholds = [2.0 if e[1] is None else e[1] for e in extra]  # ranked needs get one no confidence reaches
    ranked = [t > 1 for t in thresholds]
    refine = rows_to_refine(conf32, counts, starts, thresholds, ranked)
    conf = conf32.astype(np.float64)
    if len(refine):
        index = torch.from_numpy(refine)
        conf[refine] = S.candidate_confidence(xt[index], torch.from_numpy(cand)[index], torch.float64).numpy()
    one_threshold = thresholds.count(thresholds[0]) == n
    chosen = conf >= (thresholds[0] if one_threshold else np.repeat(thresholds, counts))
    if n == 1:
        chosen[conf.argmax()] = True
        if ranked[0]:
            rank = np.empty(total, dtype=np.int64)
            rank[np.argsort(-conf, kind="stable")] = np.arange(total)
            chosen = rank < extra[0][2]
    else:
        width = int(counts.max())
        slot = padded_slots(counts, starts, width)
        padded = np.full(n * width, -np.inf)
        padded[slot] = conf
        padded = padded.reshape(n, width)
        chosen[starts + padded.argmax(axis=1)] = True
        if any(ranked):
            order = np.argsort(-padded, axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.broadcast_to(np.arange(width), order.shape), axis=1)
            topk = np.array([e[2] for e in extra], dtype=np.int64)
            chosen = np.where(np.repeat(ranked, counts), rank.reshape(-1)[slot] < np.repeat(topk, counts), chosen)
    skip_mask = [e[4] for e in extra]
    if all(skip_mask):
        chosen &= cand != d.mask_id
        write = np.where(chosen, cand, d.mask_id)
    elif any(skip_mask):
        skip = np.repeat(skip_mask, counts)
        chosen &= (cand != d.mask_id) | ~skip
        write = np.where(chosen, cand, np.where(skip, d.mask_id, -1))
    else:
        write = np.where(chosen, cand, -1)
    _fill_last_step(d, xs, write, chosen, counts, [e[3] for e in extra])
    d.place(parts, needs.handles, write, total if n == 1 else counts)


def _usual_denoising(conf32: np.ndarray, cand: np.ndarray, counts: np.ndarray, starts: np.ndarray, extra: tuple,
                     mask_id: int) -> np.ndarray | None:
    """The usual denoising step of many blocks, decided on float32 confidences with a handful of array
    operations: one threshold for every block, no ranked schedule, the mask id never written, and no
    confidence whose float64 value could decide otherwise (none within `REFINE_MARGIN` of the threshold,
    no rival of the best in a block whose best is below it). Returns what `candidates` writes, or None
    when the step is not such a step (the general path then decides it)."""
    thresholds = {e[1] for e in extra}
    if len(thresholds) != 1 or not all(e[4] for e in extra):
        return None
    threshold = thresholds.pop()
    if threshold is None:
        return None
    above = conf32 >= threshold + REFINE_MARGIN  # comparisons alone (one ufunc loop, warm after the first)
    if np.count_nonzero(conf32 >= threshold - REFINE_MARGIN) != np.count_nonzero(above):
        return None  # a confidence within the margin of the threshold; without one, `above` is `>= threshold`
    best = np.maximum.reduceat(conf32, starts)
    top = conf32 >= np.repeat(best * (1 - REFINE_MARGIN), counts)  # the best of each block, and its rivals
    # rivals above the threshold are written anyway; a block whose best is below it writes that row alone
    if np.count_nonzero(top > above) != np.count_nonzero(best < threshold):  # top > above: top and not above
        return None
    chosen = above | top
    chosen &= cand != mask_id
    return np.where(chosen, cand, mask_id)


def _fill_last_step(d, xs: np.ndarray, write: np.ndarray, chosen: np.ndarray | None, counts: np.ndarray,
                    last: list[bool]) -> None:
    """Rows of blocks at their last step that were not written by choice get their best non-mask
    candidate (chosen None: every row holding the mask id was not written by choice)."""
    if not any(last):
        return
    last_rows = np.flatnonzero(np.repeat(last, counts))
    masked = xs[last_rows]  # a copy (fancy indexing)
    masked[:, d.mask_id] = -np.inf
    kept = write[last_rows] != d.mask_id if chosen is None else chosen[last_rows]
    write[last_rows] = np.where(kept, write[last_rows], masked.argmax(axis=1))


def _accepted(targets: np.ndarray, drafts: np.ndarray) -> np.ndarray:
    """n per request: the matching prefix of drafts [N, m-1] against targets [N, m] (padding
    lanes must not match), plus one."""
    return np.logical_and.accumulate(targets[:, :-1] == drafts, axis=1).sum(axis=1) + 1


def _ragged(d, ids: np.ndarray, first: np.ndarray, counts: np.ndarray, token_rows: np.ndarray):
    """(n, targets [N, M], valid [N, M]) for requests with different row counts, padded to the widest."""
    lane = np.arange(int(counts.max()))
    valid = lane < counts[:, None]
    targets = d.all_greedy()[np.where(valid, first[:, None] + lane, 0)]
    drafts = np.where(valid[:, 1:], ids[np.where(valid[:, 1:], token_rows[:, None] + lane[1:], 0)], -1)
    return _accepted(targets, drafts), targets, valid


def verify(d, needs, x: np.ndarray, ids: np.ndarray, parts: list) -> None:
    """Per request [n, tokens(m)]: the first n tokens are the output (see `decision_kinds.run_verify`)."""
    counts, rows, token_rows = needs.counts, needs.rows, needs.extra
    m, num = counts[0], len(counts)
    if counts.count(m) == num and evenly_spaced(rows, m) and evenly_spaced(token_rows, m):
        targets = d.all_greedy()[rows[0]: rows[0] + num * m].reshape(num, m)
        drafts = ids[token_rows[0]: token_rows[0] + num * m].reshape(num, m)[:, 1:]
        n = _accepted(targets, drafts)
        d.place(parts, needs.handles, np.concatenate((n[:, None], targets), axis=1), 1 + m)
        return
    counts = np.asarray(counts, dtype=np.int64)
    n, targets, valid = _ragged(d, ids, np.asarray(rows, dtype=np.int64), counts, np.asarray(token_rows, np.int64))
    out = np.concatenate((n[:, None], targets), axis=1)
    d.place(parts, needs.handles, out[np.concatenate((valid[:, :1], valid), axis=1)], 1 + counts)


def quad(d, needs, x: np.ndarray, ids: np.ndarray, parts: list) -> None:
    """Per request [n, tokens(k), next drafts(k-1)] (see `decision_kinds.run_quad`). A request's logit
    rows are its k drafts' then k - 1 per group; the next drafts are group n-1's."""
    counts, rows, token_rows = needs.counts, needs.rows, needs.extra
    k, num = counts[0], len(counts)
    if counts.count(k) == num and evenly_spaced(rows, k * k) and evenly_spaced(token_rows, k * (k + 1)):
        # back to back: the k targets of request i are rows r0 + i*k*k + 0..k-1 and its group n-1 the k-1
        # rows from r0 + i*k*k + k + (n-1)(k-1); only these rows are read (and checked)
        r0, vocab = rows[0], x.shape[1]
        # the target rows, copied contiguous first (numpy's argmax over a strided view is slower than both)
        heads = np.ascontiguousarray(x[r0: r0 + num * k * k].reshape(num, k * k * vocab)[:, : k * vocab])
        targets = heads.reshape(num * k, vocab).argmax(axis=-1).reshape(num, k)
        drafts = ids[token_rows[0]: token_rows[0] + num * k * (k + 1)].reshape(num, k * (k + 1))[:, 1:k]
        n = _accepted(targets, drafts)
        base = arange(num) * (k * k) + r0
        target_rows = (base[:, None] + arange(k)).reshape(-1)
        group_rows = ((base + k + (n - 1) * (k - 1))[:, None] + arange(k - 1)).reshape(-1)
        next_drafts = x.take(group_rows, axis=0).argmax(axis=-1)
        d.check_rows(np.concatenate((target_rows, group_rows)), np.concatenate((targets.reshape(-1), next_drafts)))
        out = np.concatenate((n[:, None], targets, next_drafts.reshape(num, k - 1)), axis=1)
        d.place(parts, needs.handles, out, 2 * k)
        return
    counts = np.asarray(counts, dtype=np.int64)
    first = np.asarray(rows, dtype=np.int64)
    n, targets, valid = _ragged(d, ids, first, counts, np.asarray(token_rows, dtype=np.int64))
    group = first + counts + (n - 1) * (counts - 1)
    next_valid = valid[:, 1:]
    next_drafts = d.all_greedy()[np.where(next_valid, group[:, None] + np.arange(next_valid.shape[1]), 0)]
    out = np.concatenate((n[:, None], targets, next_drafts), axis=1)
    d.place(parts, needs.handles, out[np.concatenate((valid[:, :1], valid, next_valid), axis=1)], 2 * counts)


HOST_RUNNERS = {"sample": sample_or_drafts, "drafts": sample_or_drafts, "candidates": candidates,
                "verify": verify, "quad": quad}
