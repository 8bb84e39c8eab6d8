"""The vectorised decision kinds: denoising selection, speculative acceptance, QuadraticSpec cycles.

checkpoint ──builder──▶ engine dir ──[runtime: decide (these kinds)]──▶ strategies ──▶ Triton

Each function handles every request of its kind in one step at once (ragged groups of rows
are handled with segment reductions and sorts, never a Python loop over rows) and appends
its answers to the step's packed result through `Decider.place`.
"""

from __future__ import annotations

import numpy as np
import torch

from . import batched_sampling as S

# float32 confidences within this of a threshold, or within this fraction of their block's best when
# another row is too, are recomputed in float64 (a float32 softmax over a vocabulary is off by a few
# 1e-5 of the value at most, so rows outside these margins keep their float64 order)
REFINE_MARGIN = 1e-4


def group_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def padded_slots(counts: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Where each row of ragged groups (back to back) lands in a [groups, width] layout, flattened."""
    return np.repeat(np.arange(len(counts)) * width - starts, counts) + np.arange(int(counts.sum()))


def run_candidates(d, needs, logits, ids, parts) -> None:
    """Denoising (docs/design.md §5.2): per row the token to write now, or, while the position stays masked,
    the mask id (needs that skip the mask id: the position keeps it) or -1 (the others, for which
    the mask id is a token like any other).

    A row is written when it is chosen (its block's most confident row, every row at or above the
    threshold, or the top-k of a ranked schedule) and, for needs that skip the mask id, its candidate
    is not the mask id. At a block's last step every row not written by choice gets its best
    non-mask candidate."""
    counts = np.asarray(needs.counts, dtype=np.int64)
    n, total = len(counts), int(counts.sum())
    x, cand = d.gather(logits, needs)
    # float32 confidences; on the CPU (where the exactness tests compare with float64 references) the
    # rows whose float32 value could flip a decision are then recomputed in float64
    exact = S.probability_dtype(x.device) == torch.float64
    conf = S.candidate_confidence(x, cand, torch.float32)
    extra = needs.extra
    greedy = np.array([s.params.temperature <= 0 for s in needs.strategies])
    lanes = np.concatenate([e[0] for e in extra]) if n > 1 else extra[0][0]
    if not greedy.all():
        cand = cand.clone()  # the greedy tokens are shared with the other kinds
        hot = np.repeat(~greedy, counts)
        hot_rows = d.index(np.flatnonzero(hot))
        strategies = [s for s, g in zip(needs.strategies, greedy) if not g]
        temps, _, _, seeds, counters, _, _ = d.params(strategies, counts[~greedy])
        picked = S.gumbel_argmax(x[hot_rows], temps, seeds, counters, d.index(lanes[hot]))
        cand[hot_rows] = picked
        conf[hot_rows] = S.candidate_confidence(x[hot_rows], picked, conf.dtype)
    # ranked needs (no threshold) get one no confidence reaches
    thresholds = np.array([2.0 if e[1] is None else e[1] for e in extra], dtype=np.float64)
    by_rank = thresholds > 1
    groups = _Groups(d, counts, total)
    if exact:
        conf = _refine(groups, x, cand, conf, thresholds, by_rank)
    if (thresholds == thresholds[0]).all():  # one threshold for every row: a scalar, no upload
        chosen = conf >= float(thresholds[0])
    else:
        chosen = conf >= groups.per_row(torch.from_numpy(thresholds).to(x.device)).to(conf.dtype)
    _, first = groups.max(conf)
    chosen[groups.row(first)] = True
    if by_rank.any():
        topk = np.array([e[2] for e in extra], dtype=np.int64)
        chosen = torch.where(groups.per_row(d.index(by_rank).bool()), groups.rank_desc(conf) < groups.per_row(
            d.index(topk)), chosen)
    skip_mask = np.array([e[4] for e in extra])
    if skip_mask.all():
        chosen &= cand != d.mask_id
        write = torch.where(chosen, cand, d.mask_id)
    elif skip_mask.any():
        skip = groups.per_row(d.index(skip_mask).bool())
        chosen &= (cand != d.mask_id) | ~skip
        write = torch.where(chosen, cand, torch.where(skip, d.mask_id, -1))
    else:
        write = torch.where(chosen, cand, -1)
    last = np.array([e[3] for e in extra])
    if last.any():
        _fill_last_step(d, needs, x, write, chosen, counts, greedy, last, lanes)
    d.place(parts, needs.handles, write, counts)


class _Groups:
    """Ragged groups of rows (one per need, back to back) and the few reductions decisions need."""

    def __init__(self, d, counts: np.ndarray, total: int):
        self.d, self.counts, self.n, self.total = d, counts, len(counts), total
        self.width = int(counts.max())
        self.starts = group_starts(counts)
        self._group = self._slot = None

    def group(self) -> torch.Tensor:
        if self._group is None:
            self._group = self.d.index(np.repeat(np.arange(self.n), self.counts))
        return self._group

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group values repeated over the group's rows."""
        return values.expand(self.total) if self.n == 1 else values[self.group()]

    def padded(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """[n, width] with each group's rows first, then `fill`."""
        if self.n == 1:
            return values.view(1, -1)
        if self._slot is None:
            self._slot = self.d.index(padded_slots(self.counts, self.starts, self.width))
        out = values.new_full((self.n * self.width,), fill)
        out[self._slot] = values
        return out.view(self.n, self.width)

    def max(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: the largest value and the index (within the group) of its first row."""
        return self.padded(values, float("-inf")).max(dim=1)

    def row(self, within: torch.Tensor) -> torch.Tensor:
        """Batch rows of per-group indices within the groups."""
        return within if self.n == 1 else within + self.d.index(self.starts)

    def rank_desc(self, values: torch.Tensor) -> torch.Tensor:
        """Each row's rank within its group by descending value (ties: the earlier row first)."""
        order = torch.sort(self.padded(values, float("-inf")), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(self.width, device=values.device).expand_as(order).contiguous())
        if self.n == 1:
            return rank.view(-1)
        return rank.view(-1)[self._slot]


def rows_to_refine(c: np.ndarray, counts: np.ndarray, starts: np.ndarray | None, thresholds: list[float],
                   ranked: list[bool]) -> np.ndarray:
    """Rows whose float32 confidence c could change a decision: near their threshold, near their
    block's best when another row of the block is too (a possible tie for the top), or ranked
    (top-k schedule). Usually none or a handful. Per block: thresholds and ranked (lists)."""
    one = len(counts) == 1
    if one and ranked[0]:
        return np.arange(len(c))
    best = c.max() if one else np.repeat(np.maximum.reduceat(c, starts), counts)
    near_best = c >= best * (1 - REFINE_MARGIN)
    rivals = np.count_nonzero(near_best) >= 2 if one else np.repeat(np.add.reduceat(near_best, starts) >= 2, counts)
    threshold = thresholds[0] if thresholds.count(thresholds[0]) == len(thresholds) else np.repeat(thresholds, counts)
    near = np.abs(c - threshold) <= REFINE_MARGIN
    if one:
        return np.flatnonzero(near | near_best) if rivals else np.flatnonzero(near)
    near |= near_best & rivals
    if any(ranked):
        near |= np.repeat(ranked, counts)
    return np.flatnonzero(near)


def _refine(groups, x, cand, conf, thresholds: np.ndarray, by_rank: np.ndarray) -> torch.Tensor:
    """float64 confidences (CPU only), recomputed from the logits for the `rows_to_refine` (chosen
    in numpy on a view of the CPU tensor)."""
    rows = rows_to_refine(conf.numpy(), groups.counts, groups.starts, thresholds.tolist(), by_rank.tolist())
    conf = conf.double()
    if len(rows):
        index = torch.from_numpy(rows)
        conf[index] = S.candidate_confidence(x[index], cand[index], torch.float64)
    return conf


def _fill_last_step(d, needs, x, write, chosen, counts, greedy, last, lanes) -> None:
    """Rows of blocks at their last step that were not written get their best non-mask candidate."""
    last_rows = np.flatnonzero(np.repeat(last, counts))
    index = d.index(last_rows)
    masked = x[index].clone()
    masked[:, d.mask_id] = float("-inf")
    fallback = S.row_argmax(masked)
    hot_last = last & ~greedy
    if hot_last.any():
        rows = np.flatnonzero(np.repeat(hot_last, counts))
        strategies = [s for s, h in zip(needs.strategies, hot_last) if h]
        temps, _, _, seeds, counters, _, _ = d.params(strategies, counts[hot_last])
        sub = torch.from_numpy(np.searchsorted(last_rows, rows)).to(x.device)
        fallback[sub] = S.gumbel_argmax(masked[sub], temps, seeds, counters, d.index(lanes[rows]))
    write[index] = torch.where(chosen[index], write[index], fallback)


def _accept(d, strategies: list, x: torch.Tensor, tokens: torch.Tensor, counts: np.ndarray, drafts: torch.Tensor):
    """Speculative acceptance for many requests. x: target rows a_0..a_{m-1} of each request,
    concatenated ([rows, vocab], or [requests, m, vocab] when m is the same for all), tokens
    their greedy tokens (same leading shape); drafts: d_1..d_{m-1} of each request, concatenated.
    Returns (n [N], tokens [sum m]): tokens[:n] of a request are its output (accepted drafts and
    one bonus or resampled token)."""
    dev = x.device
    num = len(counts)
    if _uniform(counts) and all(s.params.temperature <= 0 for s in strategies):  # the steady greedy case
        m = int(counts[0])
        tokens = tokens.reshape(-1)
        match = tokens.view(num, m)[:, :-1] == drafts.view(num, m - 1)
        return match.cumprod(dim=1).sum(dim=1) + 1, tokens
    x, tokens = x.reshape(-1, x.shape[-1]), tokens.reshape(-1)
    m_draft = counts - 1
    target_of_draft = d.index(np.repeat(group_starts(counts), m_draft) + within(m_draft))
    draft_group = d.index(np.repeat(np.arange(num), m_draft))
    position = d.index(within(m_draft))
    accepted = tokens[target_of_draft] == drafts
    greedy = np.array([s.params.temperature <= 0 for s in strategies])
    hot_probs = None
    if not greedy.all():
        hot_rows = np.flatnonzero(np.repeat(~greedy, counts))
        hot_strategies = [s for s, g in zip(strategies, greedy) if not g]
        temps, top_k, top_p, seeds, counters, use_k, use_p = d.params(hot_strategies, counts[~greedy])
        p = torch.zeros(x.shape, dtype=S.probability_dtype(dev), device=dev)
        hot_index = d.index(hot_rows)
        p[hot_index] = S.distribution_rows(x[hot_index], temps, top_k, top_p, use_k, use_p)
        q = torch.zeros((int(m_draft.sum()),) + x.shape[1:], dtype=p.dtype, device=dev)
        draft_starts = group_starts(m_draft)
        for s, g, start, m in zip(strategies, greedy, draft_starts, m_draft):
            if not g and m:
                q[start: start + m] = s.draft_probs[:m].to(p.dtype)
        _, _, _, seeds_d, counters_d, _, _ = d.params(strategies, m_draft)
        u = S.uniform(seeds_d, counters_d, S.STREAM_ACCEPT, position[:, None])[:, 0]
        pd = p[target_of_draft].gather(1, drafts[:, None])[:, 0]
        qd = q.gather(1, drafts[:, None])[:, 0]
        hot_draft = d.index(np.repeat(~greedy, m_draft)).bool()
        accepted = torch.where(hot_draft, (qd > 0) & (u * qd < pd), accepted)
        hot_probs = (p, q, hot_index, hot_strategies)
    big = int(counts.max())
    first_reject = torch.full((num,), big, dtype=torch.int64, device=dev)
    first_reject = first_reject.scatter_reduce(0, draft_group, torch.where(accepted, big, position), "amin")
    n = torch.minimum(first_reject, d.index(m_draft)) + 1
    if hot_probs is not None:
        tokens = _resample(d, hot_probs, counts, greedy, n, drafts, tokens)
    return n, tokens


def within(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count, concatenated."""
    total = int(counts.sum())
    return np.arange(total) - np.repeat(group_starts(counts), counts)


def _resample(d, hot_probs, counts, greedy, n, drafts, tokens) -> torch.Tensor:
    """At temperature > 0: accepted drafts, then a draw from normalise(max(p - q, 0)) at the first
    rejection (or from p after the last draft when every draft was accepted)."""
    p, q, hot_index, hot_strategies = hot_probs
    dev = p.device
    m_draft = counts - 1
    hot = ~greedy
    starts, draft_starts = group_starts(counts), group_starts(m_draft)
    j = n[d.index(np.flatnonzero(hot))] - 1  # the output position that is drawn, per hot request
    prow = p[d.index(starts[hot]) + j]
    q_index = (d.index(draft_starts[hot]) + j).clamp(max=max(q.shape[0] - 1, 0))
    rejected = j < d.index(m_draft[hot])
    qrow = q[q_index] * rejected[:, None] if q.shape[0] else torch.zeros_like(prow)
    residual = (prow - qrow).clamp(min=0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, prow, residual)
    _, _, _, seeds, counters, _, _ = d.params(hot_strategies)
    u = S.uniform(seeds, counters, S.STREAM_RESIDUAL, torch.zeros(1, dtype=torch.int64, device=dev))[:, 0]
    drawn = S.inverse_cdf(residual, u)
    out = tokens.clone()
    hot_rows_of_drafts = np.flatnonzero(np.repeat(hot, m_draft))
    if len(hot_rows_of_drafts):  # accepted drafts are the output at T > 0
        target = d.index(np.repeat(starts, m_draft) + within(m_draft))[d.index(hot_rows_of_drafts)]
        out[target] = drafts[d.index(hot_rows_of_drafts)]
    out[d.index(starts[hot]) + j] = drawn
    return out


def _pack(d, parts, needs, n: torch.Tensor, tokens: torch.Tensor, counts: np.ndarray, extra=None,
          extra_counts=None):
    """Per request: [n, tokens(m), extra(e)] flattened in request order."""
    num = len(counts)
    if _uniform(counts):
        m = int(counts[0])
        columns = [n[:, None], tokens.view(num, m)]
        if extra is not None:
            columns.append(extra.view(num, int(extra_counts[0])))
        out = torch.cat(columns, dim=1)
        d.place(parts, needs.handles, out, out.shape[1])
        return
    widths = 1 + counts + (extra_counts if extra_counts is not None else 0)
    starts = group_starts(widths)
    out = torch.empty(int(widths.sum()), dtype=torch.int64, device=tokens.device)
    out[d.index(starts)] = n
    out[d.index(np.repeat(starts + 1, counts) + within(counts))] = tokens
    if extra is not None:
        out[d.index(np.repeat(starts + 1 + counts, extra_counts) + within(extra_counts))] = extra
    d.place(parts, needs.handles, out, widths)


def _uniform(counts: np.ndarray) -> bool:
    return bool((counts == counts[0]).all())


def evenly_spaced(starts, step: int) -> bool:
    """Whether needs starting at `starts` (rows or tokens, increasing, each need spanning at least
    `step` of them) are exactly `step` apart: back-to-back segments of one shape. Under that
    invariant the first and last start tell."""
    return starts[-1] - starts[0] == step * (len(starts) - 1)


def _drafts(d, ids, token_rows: np.ndarray, counts: np.ndarray, segment_length: int) -> torch.Tensor:
    """d_1..d_{m-1} of each request: the tokens after each segment's first token (segments of
    `segment_length` tokens back to back take one strided view)."""
    if _uniform(counts) and evenly_spaced(token_rows, segment_length):
        m, start, num = int(counts[0]), int(token_rows[0]), len(counts)
        return ids[start: start + segment_length * num].view(num, segment_length)[:, 1:m].reshape(-1)
    return ids[d.index(np.repeat(token_rows + 1, counts - 1) + within(counts - 1))]


def run_verify(d, needs, logits, ids, parts) -> None:
    counts = np.asarray(needs.counts, dtype=np.int64)
    x, greedy = d.gather(logits, needs)
    drafts = _drafts(d, ids, np.asarray(needs.extra, dtype=np.int64), counts, int(counts[0]))
    n, tokens = _accept(d, needs.strategies, x, greedy, counts, drafts)
    _pack(d, parts, needs, n, tokens, counts)


def run_quad(d, needs, logits, ids, parts) -> None:
    """Verify the k drafts, then draft the next block from the accepted group's mask slots."""
    k = np.asarray(needs.counts, dtype=np.int64)
    first = np.asarray(needs.rows, dtype=np.int64)
    num = len(k)
    drafts = _drafts(d, ids, np.asarray(needs.extra, dtype=np.int64), k, int(k[0]) * (int(k[0]) + 1))
    if _uniform(k) and evenly_spaced(first, int(k[0]) ** 2):  # steady: equal k, segments back to back
        kk, start = int(k[0]), int(first[0])
        block = logits[start: start + num * kk * kk].view(num, kk * kk, -1)
        block_greedy = d.greedy[start: start + num * kk * kk].view(num, kk * kk)
        n, tokens = _accept(d, needs.strategies, block[:, :kk], block_greedy[:, :kk], k, drafts)
        # group n-1 of request i starts at logit row start + i*k^2 + k + (n-1)(k-1)
        first_slot = d.index((start + kk - (kk - 1)) + kk * kk * np.arange(num)[:, None] + np.arange(kk - 1))
        group_rows = (first_slot + (n * (kk - 1))[:, None]).reshape(-1)
    else:
        index = d.index(np.repeat(first, k) + within(k))
        n, tokens = _accept(d, needs.strategies, logits[index], d.greedy[index], k, drafts)
        group_base = d.index(first + k) + (n - 1) * d.index(k - 1)
        need_of_row = d.index(np.repeat(np.arange(num), k - 1))
        group_rows = group_base[need_of_row] + d.index(within(k - 1))
    next_drafts = d.choose(lambda: logits[group_rows], d.greedy[group_rows], needs.strategies, k - 1, S.STREAM_DRAFT,
                           keep_probs=True)
    _pack(d, parts, needs, n, tokens, k, next_drafts, k - 1)
