"""Logit bias and min-token masks: a request's own changes to its logit rows, before every decision.

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ bias, min-token masks ▶ grammar masks]──▶ Triton

A strategy names, with its needs, the output index each of its logit rows decides (`Decider.adjust`):
the verifier rows of the spec modes the index of the token they verify, a draft or denoising row the
index its token would take. `RowAdjustments.apply` then, for the rows of every such request of the
step at once, adds the request's `logit_bias` to its ids and sets its stop ids (end-of-sequence unless
ignored, and stop_token_ids) to -inf in the rows whose index is below `min_tokens`. Every mode thus
decides under the same rows, and at temperature 0 the spec modes still equal AR (docs/design.md §5.6).
The original rows come back for the log-probabilities, which stay raw (§11).
"""

from __future__ import annotations

import numpy as np
import torch


def wants_adjustment(params) -> bool:
    return bool(params.logit_bias) or params.min_tokens > 0


class RowAdjustments:
    """One step's registrations: (first logit row, output index per row, the request's bias ids and
    values, its stop ids, min_tokens)."""

    def __init__(self):
        self.items: list[tuple] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, strategy, first_row: int, indices: np.ndarray) -> None:
        params = strategy.params
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

        def put(rows, cols):
            return (torch.from_numpy(np.concatenate(rows)).to(device), torch.from_numpy(np.concatenate(cols)).to(device))

        if bias_rows:
            values = torch.from_numpy(np.concatenate(bias_values)).to(device=device, dtype=logits.dtype)
            logits.index_put_(put(bias_rows, bias_cols), values, accumulate=True)
        if ban_rows:
            logits.index_put_(put(ban_rows, ban_cols), torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
        return (index, original) if keep else None
