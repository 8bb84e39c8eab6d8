"""mode="auto": the engine picks each request's decoding mode, per step, from costs measured on this machine.

checkpoint ──builder──▶ engine dir ──[runtime: engine loop ▶ auto policy ▶ strategies]──▶ Triton

AR, linear-spec and quadratic-spec give the same output at temperature 0, and the spec modes' rejection
sampling keeps AR's distribution above it, so a request may change between them at any boundary
(`DecodeStrategy.boundary`: nothing half-verified is held) without changing what it generates.
Diffusion's output differs: auto never picks it. The choice maximises the batch's output tokens per
second, from two things learned online (docs/design.md §5.7):

- `StepCosts`: the seconds of an engine step by the tokens in it (every decode step is a sample), one
  table per number of requests in the step, kept per bucket of token counts and interpolated;
- `Yields`: each mode's recent output tokens per request-forward (every request of that mode is a
  sample; AR's is 1).

Before each step the auto requests at a boundary first move to one mode together if that pays, then
each takes the mode that maximises (tokens the step yields) / (predicted seconds of the step), the
others' modes held; a change must win by a margin (no flapping). A mode not tried for a while gets
one request-cycle, so its estimates stay current.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from nemodiff.runtime.decoding.strategies import STRATEGIES
from nemodiff.runtime.request import AUTO_MODES

DECAY = 0.995  # the weight an older yield sample keeps per newer one (about the last 200 request-forwards)
STEP_WEIGHT = 0.1  # the weight of a new step-time sample in its bucket's average
BUCKETS_PER_DOUBLING = 4
MARGIN = 0.03  # a switch must raise the predicted tokens per second by this fraction of the request's share
EXPLORE_AFTER = 256  # engine steps without a sample of a mode before a request tries it for a cycle
MIN_SAMPLES = 2  # request-forwards of a spec mode before its measured yield replaces the optimistic prior


class StepCosts:
    """Seconds per engine step by the tokens in it: an average per bucket of token counts (a quarter of a
    doubling wide), made non-decreasing in the tokens by pooling adjacent buckets that disagree (isotonic
    regression, weighted by samples: a larger step never costs less, what looks so is noise), interpolated
    linearly between buckets; past the largest, in proportion to the tokens (or by the last two buckets'
    slope if steeper: a size never run is not taken to be cheap until it has run), below the smallest, the
    smallest's."""

    def __init__(self):
        self.buckets: dict[int, list[float]] = {}  # bucket -> [mean tokens, mean seconds, samples (capped)]
        self._points: list[tuple[float, float]] | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0:
            return
        key = round(BUCKETS_PER_DOUBLING * math.log2(tokens))
        entry = self.buckets.get(key)
        if entry is None:
            self.buckets[key] = [float(tokens), seconds, 1.0]
        else:
            entry[0] += STEP_WEIGHT * (tokens - entry[0])
            entry[1] += STEP_WEIGHT * (seconds - entry[1])
            entry[2] = min(entry[2] + 1, 1 / STEP_WEIGHT)
        self._points = None

    def predict(self, tokens: float) -> float | None:
        """Predicted seconds of a step of `tokens` tokens; None before any sample."""
        if self._points is None:
            self._points = isotonic(sorted(self.buckets.values()))
        points = self._points
        if not points:
            return None
        if tokens <= points[0][0]:
            return points[0][1]
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if tokens <= n1:
                return t0 + (t1 - t0) * (tokens - n0) / (n1 - n0) if n1 > n0 else t1
        n1, t1 = points[-1]  # past the largest: in proportion, or by the last two buckets' slope if steeper
        slope = max((t1 - points[-2][1]) / (n1 - points[-2][0]), 0.0) if len(points) > 1 else 0.0
        return max(t1 * tokens / n1, t1 + slope * (tokens - n1))


def decoding(strategy) -> bool:
    """Whether the strategy's step is a decode step: no prompt (a prefill, QuadraticSpec's first cycle)."""
    return getattr(strategy, "phase", None) not in ("prefill", "first") and getattr(strategy, "last_token", 0) is not None


def isotonic(buckets: list[list[float]]) -> list[tuple[float, float]]:
    """(tokens, seconds) of buckets sorted by tokens, the seconds made non-decreasing by pooling adjacent
    violators (weighted means)."""
    blocks: list[list[float]] = []  # [weighted seconds, weight, buckets pooled]
    for _, seconds, weight in buckets:
        blocks.append([seconds * weight, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, w, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += w
            blocks[-1][2] += count
    seconds = [b[0] / b[1] for b in blocks for _ in range(int(b[2]))]
    return [(b[0], t) for b, t in zip(buckets, seconds)]


class Yields:
    """Each mode's recent output tokens per request-forward (decayed sums; AR's is 1). Until a spec mode has
    MIN_SAMPLES samples it is taken to accept every draft, so that it gets tried."""

    def __init__(self, block_length: int):
        self.prior = {"linear-spec": block_length / 2, "quadratic-spec": float(block_length)}
        self.tokens = {mode: 0.0 for mode in self.prior}
        self.forwards = {mode: 0.0 for mode in self.prior}
        self.samples = {mode: 0 for mode in self.prior}
        self.last_seen = {mode: -EXPLORE_AFTER - 1 for mode in AUTO_MODES}  # untried: explored at once

    def observe(self, mode: str, tokens: int, step: int) -> None:
        self.last_seen[mode] = step
        if mode in self.tokens:
            self.tokens[mode] = DECAY * self.tokens[mode] + tokens
            self.forwards[mode] = DECAY * self.forwards[mode] + 1
            self.samples[mode] += 1

    def rate(self, mode: str) -> float:
        if mode not in self.tokens:
            return 1.0
        return self.tokens[mode] / self.forwards[mode] if self.samples[mode] >= MIN_SAMPLES else self.prior[mode]


@dataclass(eq=False)
class AutoState:
    """An auto request's strategies (one per mode it has run, kept for a switch back) and its record."""

    strategies: dict = field(default_factory=dict)
    steps: Counter = field(default_factory=Counter)  # request-forwards by mode
    switches: int = 0
    exploring: bool = False  # the current mode was given to refresh its estimates
    explored: int = 0  # decode steps run since (it keeps the mode until one has run)

    def stats(self) -> dict:
        return {"modes": dict(self.steps), "mode_switches": self.switches}


class AutoPolicy:
    def __init__(self, ctx):
        self.ctx = ctx
        self.tables: dict[int, StepCosts] = {}  # step costs by the requests in the step
        self.costs = StepCosts()  # the table of the step being decided
        self.yields = Yields(ctx.block_length)
        self.steps = Counter()  # auto request-forwards by mode (nemodiff_auto_mode_steps_total)
        self.step_index = 0

    # -- what one request-forward of a mode costs and gives -----------------------------------
    def step_tokens(self, mode: str, sequence) -> int:
        B = sequence.request.params.block_length or self.ctx.block_length
        return 1 if mode == "ar" else B * (B + 1) if mode == "quadratic-spec" else B

    def step_yield(self, mode: str) -> float:
        return self.yields.rate(mode) if mode in AUTO_MODES else 1.0

    def candidates(self, sequence) -> tuple[str, ...]:
        block = sequence.request.params.block_length or self.ctx.block_length
        return AUTO_MODES if block <= self.ctx.block_length else ("ar", "linear-spec")

    # -- learning ------------------------------------------------------------------------------
    def observe_step(self, tokens: int, seconds: float, requests: int = 1) -> None:
        """A decode step of `requests` requests (steps with prompt tokens cost more per token: they would bias
        the choice). Costs are kept per number of requests: the host's work per request (answers, stop rules)
        would otherwise pass for the cost of tokens."""
        self.step_index += 1
        table = self.tables.get(requests)
        if table is None:
            table = self.tables[requests] = StepCosts()
        table.observe(tokens, seconds)

    def table(self, requests: int) -> StepCosts:
        """The step costs at this many requests, or at the nearest number that has some."""
        if requests in self.tables:
            return self.tables[requests]
        if not self.tables:
            return StepCosts()
        return self.tables[min(self.tables, key=lambda r: abs(math.log(r / max(requests, 1))))]

    def observe(self, sequence, tokens: int, steady: bool) -> None:
        """A request-forward of any request (steady: not a prefill or a mode's first cycle)."""
        mode = sequence.strategy.mode
        if steady and mode in AUTO_MODES:
            self.yields.observe(mode, tokens, self.step_index)
        if sequence.auto is not None:
            self.steps[mode] += 1
            sequence.auto.steps[mode] += 1
            sequence.auto.explored += steady

    # -- choosing ------------------------------------------------------------------------------
    def scores(self, modes, base_tokens: float, base_yield: float, block: int) -> dict[str, float]:
        """Predicted output tokens per second of the step with one more request in each of `modes`, the others
        giving base_yield tokens from base_tokens tokens."""
        scores = {}
        for mode in modes:
            tokens = 1 if mode == "ar" else block * (block + 1) if mode == "quadratic-spec" else block
            seconds = self.costs.predict(base_tokens + tokens)
            scores[mode] = (base_yield + self.step_yield(mode)) / seconds if seconds else self.step_yield(mode)
        return scores

    def choose(self, current: str, modes, base_tokens: float, base_yield: float, block: int, share: float = 1.0) -> str:
        """The mode a request at a boundary takes: the best score, unless the current one is within MARGIN of
        this request's share (1 / the running requests) of the step's tokens per second."""
        scores = self.scores(modes, base_tokens, base_yield, block)
        best = max(modes, key=scores.__getitem__)
        now = scores.get(current, 0.0)
        return best if scores[best] > now + MARGIN * share * now else current

    def strategy_for(self, sequence, mode: str):
        state = sequence.auto
        strategy = state.strategies.get(mode)
        if strategy is None:
            strategy = state.strategies[mode] = STRATEGIES[mode](sequence.request, self.ctx)
        return strategy

    def switch(self, sequence, mode: str) -> None:
        """Move an auto request at a boundary to `mode` (its strategy takes over the cache and random stream)."""
        if mode != sequence.strategy.mode:
            chosen = self.strategy_for(sequence, mode)
            chosen.take_over(sequence.strategy)
            sequence.strategy = chosen
            sequence.auto.switches += 1

    def assign(self, running: list) -> None:
        """Before a step: give each auto request at a boundary the mode that maximises the step's tokens per
        second (the others' modes held)."""
        switchable = [s for s in running if s.auto is not None and s.strategy.boundary()
                      and not (s.auto.exploring and not s.auto.explored)]
        if not switchable:
            return
        self.costs = self.table(len(running))
        tokens = sum(self.step_tokens(s.strategy.mode, s) for s in running)
        yielded = sum(self.step_yield(s.strategy.mode) for s in running)
        together = self.together(switchable, tokens, yielded)
        if together is not None:  # first all of them at once: a step's fixed costs pay off only then
            for sequence in switchable:
                current = sequence.strategy.mode
                self.switch(sequence, together)
                tokens += self.step_tokens(together, sequence) - self.step_tokens(current, sequence)
                yielded += self.step_yield(together) - self.step_yield(current)
        stale = [m for m in AUTO_MODES if self.step_index - self.yields.last_seen[m] > EXPLORE_AFTER]
        for sequence in switchable:
            current, state = sequence.strategy.mode, sequence.auto
            modes = self.candidates(sequence)
            base_tokens = tokens - self.step_tokens(current, sequence)
            base_yield = yielded - self.step_yield(current)
            explore = next((m for m in stale if m in modes and m != current), None)
            if explore is not None:  # one request at a time refreshes a mode nobody ran for a while
                best = explore
                stale.remove(explore)
                self.yields.last_seen[explore] = self.step_index
            else:
                block = sequence.request.params.block_length or self.ctx.block_length
                # after an exploring cycle the request goes back to the best mode without the margin
                best = self.choose("" if state.exploring else current, modes, base_tokens, base_yield, block,
                                   1 / len(running))
            state.exploring, state.explored = explore is not None, 0
            self.switch(sequence, best)
            tokens += self.step_tokens(best, sequence) - self.step_tokens(current, sequence)
            yielded += self.step_yield(best) - self.step_yield(current)

    def together(self, switchable: list, tokens: float, yielded: float) -> str | None:
        """The mode all requests at a boundary should take together, when the step would then give more tokens
        per second than as it stands by MARGIN; else None. (One request's move alone may not pay where the
        step's cost has a knee: a device with room runs 8 x 16 tokens in about the time of 8 x 1.)"""
        now = self.costs.predict(tokens)
        if not now:
            return None
        keep_tokens = tokens - sum(self.step_tokens(s.strategy.mode, s) for s in switchable)
        keep_yield = yielded - sum(self.step_yield(s.strategy.mode) for s in switchable)
        best, best_score = None, yielded / now * (1 + MARGIN)
        for mode in AUTO_MODES:
            if any(mode not in self.candidates(s) for s in switchable):
                continue
            seconds = self.costs.predict(keep_tokens + sum(self.step_tokens(mode, s) for s in switchable))
            score = (keep_yield + len(switchable) * self.step_yield(mode)) / seconds if seconds else 0.0
            if score > best_score:
                best, best_score = mode, score
        return best
