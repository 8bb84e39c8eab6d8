"""Structured output under diffusion: how a guided denoising row reveals, from its masked logits.

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ grammar masks ▶ denoising reveals]──▶ Triton

grammar_batch.py walks a DIFFUSE job's rows (strategies/diffusion.py `_guided_step`: reveal left to right
while confident); for the rows whose masks it filled in a round it asks here, for all of them at once:
the masked greedy token's renormalised probability (`confidences`, where the reveal depends on it), a
sample from the masked distribution at temperature > 0 (`samples`), and the rule itself (`reveal`).
"""

from __future__ import annotations

import numpy as np

from .batched_sampling import STREAM_GRAMMAR, row_hash, uniform_lane


class Diffuse:
    """How a DIFFUSE job reveals (strategies/diffusion.py `_guided_step`): tau (confidence threshold) or
    k (top-k schedule: the step reveals up to k), last (the block's last step: reveal every walked row),
    temperature, and at temperature > 0 draw: (seed, draw counter) of the step's counter-based uniforms
    (batched_sampling.py; lane: the walked row)."""

    __slots__ = ("tau", "k", "last", "temperature", "draw", "by_confidence", "_hash")

    def __init__(self, tau: float | None, k: int, last: bool, temperature: float, draw: tuple[int, int] | None = None):
        self.tau, self.k, self.last, self.temperature, self.draw = tau, k, last, temperature, draw
        # rows after the first reveal by their greedy token's masked confidence
        self.by_confidence = tau is not None and not last and draw is None
        self._hash: int | None = None

    def uniform(self, row: int) -> float:
        """The step's counter-based uniform for a walked row (batched_sampling.py; its row hash computed once)."""
        if self._hash is None:
            self._hash = row_hash(self.draw[0], self.draw[1], STREAM_GRAMMAR)
        return uniform_lane(self._hash, row)


def confidences(masked: np.ndarray, best: np.ndarray) -> dict:
    """Per masked row, 1 / sum(exp(row - row[best])): its first maximum's renormalised probability. float32
    first; rows within a hair of a threshold are summed again in float64 by `_reaches`."""
    top = masked[np.arange(len(masked)), best]
    return {"sum32": np.exp(masked - top[:, None]).sum(axis=1).tolist(), "rows": masked, "top": top}


def _reaches(conf: dict, k: int, tau: float) -> bool:
    """Whether row k's greedy probability reaches tau, decided as float64 arithmetic decides it."""
    total = conf["sum32"][k]
    limit = 1.0 / tau
    if abs(total - limit) > 1e-4 * limit:  # float32's error on a sum of <= vocab terms in [0, 1] is far smaller
        return 1.0 / total >= tau
    row = conf["rows"][k].astype(np.float64)
    return 1.0 / np.exp(row - np.float64(conf["top"][k])).sum() >= tau


def samples(masked: np.ndarray, rules: list[Diffuse], rows: list[int]) -> list[tuple[int, float]]:
    """(token, probability) drawn from each masked row at its rule's temperature: the request's counter-based
    uniform for that walked row (`rows`), inverted through the row's cumulative distribution; one numpy pass
    over the rows."""
    scale = np.array([1.0 / d.temperature for d in rules], dtype=np.float32)[:, None]
    x = masked * scale
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    cdf = np.cumsum(x, axis=1, dtype=np.float64)
    u = np.array([d.uniform(row) for d, row in zip(rules, rows)]) * cdf[:, -1]
    tokens = np.minimum((cdf <= u[:, None]).sum(axis=1), cdf.shape[1] - 1)
    weights = x[np.arange(len(rules)), tokens]
    out = []
    for row, (token, weight) in enumerate(zip(tokens.tolist(), weights.tolist())):
        while weight == 0.0 and token:  # the last allowed token when u lands on the top edge
            token -= 1
            weight = float(x[row, token])
        out.append((token, weight / float(cdf[row, -1])))
    return out


def reveal(d: Diffuse, j: int, greedy: int, confidence: dict | None, ask: list[int], i: int,
           sample: tuple[int, float] | None) -> int | None:
    """A denoising row under its mask: the token to reveal, or None (stays masked; the walk ends). greedy:
    the masked row's first maximum; confidence: its renormalised probability where a reveal depends on it
    (`confidences` of the rows `ask`; this row is the round's row i); sample: (token, probability) drawn
    from the masked row at temperature > 0 (`samples`)."""
    if sample is not None:  # temperature > 0: a sample from the masked distribution
        token, p = sample
        if j == 0 or d.last:
            return token
        return token if (p >= d.tau if d.tau is not None else j < d.k) else None
    if j == 0 or d.last:
        return greedy
    if d.tau is None:
        return greedy if j < d.k else None
    return greedy if _reaches(confidence, ask.index(i), d.tau) else None
