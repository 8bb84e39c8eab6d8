"""Penalties, logit bias and min-token masks: a request's own changes to its logit rows, before every decision.

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ penalties, bias, min-token masks ▶ grammar masks]──▶ Triton

A strategy names, with its needs, the output index each of its logit rows decides (`Decider.adjust`):
the verifier rows of the spec modes the index of the token they verify, a draft or denoising row the
index its token would take. `RowAdjustments.apply` then, for the rows of every such request of the
step at once, adds the request's `logit_bias` to its ids and sets its stop ids (end-of-sequence unless
ignored, and stop_token_ids) to -inf in the rows whose index is below `min_tokens`. Every mode thus
decides under the same rows, and at temperature 0 the spec modes still equal AR (docs/design.md §5.6).
The original rows come back for the log-probabilities, which stay raw (§11).

Penalties come first, with vLLM's rules: `repetition_penalty` divides the positive logits and multiplies
the negative ones of every token in the prompt or the output, `frequency_penalty` is subtracted times
the token's count in the output, `presence_penalty` once for every token in the output. A row counts
the output before its index: a strategy also names the drafted tokens a row follows (`drafts`, row i
after the first `depths[i]` of them), so that a verifier row is penalised exactly as AR's row for that
position would be. Only the (row, token) entries of tokens seen are read and written.
"""

from __future__ import annotations

import numpy as np
import torch


def wants_adjustment(params) -> bool:
    return bool(params.logit_bias) or params.min_tokens > 0 or params.penalized()


class PenaltyCounts:
    """A request's token counts for the penalties, kept up to date with its output at O(new tokens) a step:
    the ids of the prompt (only with a repetition penalty) and of the output, sorted, and each id's count in
    the output."""

    def __init__(self, request):
        self.request = request
        use_prompt = request.params.repetition_penalty != 1
        self.prompt = np.unique(np.asarray(request.prompt_ids, dtype=np.int64)) if use_prompt else _NONE
        self.counts: dict[int, int] = {}
        self.seen = 0
        self._arrays = (self.prompt, np.zeros(len(self.prompt), dtype=np.int64))

    @classmethod
    def of(cls, request) -> "PenaltyCounts":
        if request.penalty_counts is None:
            request.penalty_counts = cls(request)
        return request.penalty_counts

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids of the prompt and the output, sorted; their counts in the output)."""
        output = self.request.output_ids
        if self.seen != len(output):
            counts = self.counts
            for token in output[self.seen:]:
                counts[token] = counts.get(token, 0) + 1
            self.seen = len(output)
            out = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            ids = np.union1d(self.prompt, out)
            values = np.zeros(len(ids), dtype=np.int64)
            values[np.searchsorted(ids, out)] = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
            self._arrays = (ids, values)
        return self._arrays

    def after(self, drafts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The arrays with the drafted tokens `drafts` counted after the output."""
        ids, values = self.arrays()
        if not len(drafts):
            return ids, values
        extra, times = np.unique(drafts, return_counts=True)
        every = np.union1d(ids, extra)
        counts = np.zeros(len(every), dtype=np.int64)
        counts[np.searchsorted(every, ids)] = values
        counts[np.searchsorted(every, extra)] += times
        return every, counts


_NONE = np.zeros(0, dtype=np.int64)


def penalty_entries(strategy, rows: np.ndarray, drafts, depths) -> tuple | None:
    """(rows, token ids, output counts, repetition, frequency, presence) of the penalised (row, token) entries
    of a request's rows, row i after the output and drafts[:depths[i]]; None without penalties."""
    params = strategy.params
    if not params.penalized():
        return None
    counts = PenaltyCounts.of(strategy.request)
    depths = np.zeros(len(rows), dtype=np.int64) if depths is None else np.asarray(depths, dtype=np.int64)
    drafts = _NONE if drafts is None else np.asarray(drafts, dtype=np.int64)
    row_parts, id_parts, count_parts = [], [], []
    for depth in np.unique(depths).tolist():
        ids, values = counts.after(drafts[:depth])
        chosen = rows[depths == depth]
        row_parts.append(np.repeat(chosen, len(ids)))
        id_parts.append(np.tile(ids, len(chosen)))
        count_parts.append(np.tile(values, len(chosen)))
    return (np.concatenate(row_parts), np.concatenate(id_parts), np.concatenate(count_parts),
            float(params.repetition_penalty), float(params.frequency_penalty), float(params.presence_penalty))


def apply_penalties(logits: torch.Tensor, entries: list[tuple]) -> None:
    """Penalise the (row, token) entries of every request in place, in float32 (vLLM's rules)."""
    rows = np.concatenate([e[0] for e in entries])
    if not len(rows):
        return
    sizes = [len(e[0]) for e in entries]
    device = logits.device

    def per_entry(index: int) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.array([e[index] for e in entries], dtype=np.float32), sizes)).to(device)

    where = (torch.from_numpy(rows).to(device), torch.from_numpy(np.concatenate([e[1] for e in entries])).to(device))
    counts = torch.from_numpy(np.concatenate([e[2] for e in entries]).astype(np.float32)).to(device)
    values = logits[where].float()
    repetition = per_entry(3)
    values = torch.where(values > 0, values / repetition, values * repetition)
    values = values - per_entry(4) * counts - per_entry(5) * (counts > 0).float()
    logits[where] = values.to(logits.dtype)


class RowAdjustments:
    """One step's registrations: (first logit row, output index per row, the request's bias ids and
    values, its stop ids, min_tokens), and the penalised entries."""

    def __init__(self):
        self.items: list[tuple] = []
        self.penalties: list[tuple] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, strategy, first_row: int, indices: np.ndarray, drafts=None, depths=None) -> None:
        params = strategy.params
        entries = penalty_entries(strategy, first_row + np.arange(len(indices), dtype=np.int64), drafts, depths)
        if entries is not None:
            self.penalties.append(entries)
        bias = params.logit_bias or {}
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        values = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
        stops = np.array(sorted(strategy.request.stop_ids()), dtype=np.int64) if params.min_tokens else None
        self.items.append((first_row, np.asarray(indices, dtype=np.int64), ids, values, stops, params.min_tokens))

    def apply(self, logits: torch.Tensor, keep: bool):
        """Change the registered rows in place; returns (rows, original rows) when keep, else None."""
        bias_rows, bias_cols, bias_values, ban_rows, ban_cols, touched = [], [], [], [], [], []
        for first, indices, ids, values, stops, min_tokens in self.items:
            rows = first + np.arange(len(indices), dtype=np.int64)
            touched.append(rows)
            if len(ids):
                bias_rows.append(np.repeat(rows, len(ids)))
                bias_cols.append(np.tile(ids, len(rows)))
                bias_values.append(np.tile(values, len(rows)))
            if stops is not None and len(stops):
                early = rows[indices < min_tokens]
                if len(early):
                    ban_rows.append(np.repeat(early, len(stops)))
                    ban_cols.append(np.tile(stops, len(early)))
        device = logits.device
        index = torch.from_numpy(np.unique(np.concatenate(touched))).to(device) if keep else None
        original = logits[index] if keep else None
        if self.penalties:
            apply_penalties(logits, self.penalties)

        def put(rows, cols):
            return (torch.from_numpy(np.concatenate(rows)).to(device), torch.from_numpy(np.concatenate(cols)).to(device))

        if bias_rows:
            values = torch.from_numpy(np.concatenate(bias_values)).to(device=device, dtype=logits.dtype)
            logits.index_put_(put(bias_rows, bias_cols), values, accumulate=True)
        if ban_rows:
            logits.index_put_(put(ban_rows, ban_cols), torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
        return (index, original) if keep else None
