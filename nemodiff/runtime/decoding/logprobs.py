"""Log-probabilities of the tokens a step decided, batched with the step's decisions (docs/design.md §11).

checkpoint ──builder──▶ engine dir ──[runtime: decide ▶ log-probabilities]──▶ serving

A strategy whose request asks for log-probabilities registers, next to its decision, the logit
rows that decide its tokens and where in the decision's answer each row's token lies. After the
decision kinds ran (so the tokens are known, on the logits' device), one pass over only those rows
computes, at temperature 1 and before top-k, top-p or any mask (vLLM's "raw" log-probabilities):
the log-softmax value of each row's token, and the row's K most likely tokens with theirs (K the
largest any request of the step asks for). The float32 results travel in the step's single
device-to-host copy, their bits carried in the packed int64 answer. Nothing runs when no request
asks.

Which rows: AR and the first token of every mode, the causal row that predicted it; LinearSpec and
QuadraticSpec, the verify rows (the same causal logits as AR, so the same values); diffusion, the
denoising row of the step that revealed the token ("denoise" source: no causal distribution exists
for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nemodiff.runtime.request import MAX_TOP_LOGPROBS as MAX_TOP  # (OpenAI's top_logprobs limit)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "logprob": self.logprob, "top": [[t, lp] for t, lp in self.top]}


@dataclass
class _Ask:
    first_row: int
    count: int
    answer: int  # the decision handle whose answer holds the tokens
    offset: int  # where the first row's token lies in that answer
    top: int
    handle: int


class LogprobPass:
    """The log-probability asks of one step, and their answers once fetched."""

    def __init__(self):
        self.asks: list[_Ask] = []
        self.width = 0  # floats per row in the result: 1 + 2 * top
        self._start = 0  # where the results start in the packed answer
        self._values: np.ndarray | None = None

    def ask(self, first_row: int, count: int, answer: int, offset: int, top: int) -> int:
        handle = len(self.asks)
        self.asks.append(_Ask(first_row, count, answer, offset, min(max(int(top), 0), MAX_TOP), handle))
        return handle

    def run(self, logits: torch.Tensor, packed, starts: list[int], placed: int):
        """The results, packed as int64 (float32 bits) for the step's copy; `packed`: the decisions'
        answers (device tensor or host array), `starts`: where each decision handle's answer begins."""
        rows = np.concatenate([np.arange(a.first_row, a.first_row + a.count) for a in self.asks])
        where = np.concatenate([np.arange(a.count) + starts[a.answer] + a.offset for a in self.asks])
        top = max(a.top for a in self.asks)
        device = logits.device
        tokens = torch.as_tensor(packed)[torch.from_numpy(where).to(device)].clamp(min=0)
        x = logits[torch.from_numpy(rows).to(device)].float()
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        columns = [x.gather(1, tokens[:, None]) - lse]
        if top:
            values, ids = x.topk(top, dim=-1)
            columns += [values - lse, ids.float()]  # token ids are exact in float32 (< 2^24)
        out = torch.cat(columns, dim=1).contiguous()
        self.width, self._start = out.shape[1], placed
        return out.view(torch.int32).to(torch.int64).reshape(-1)

    def read(self, host: np.ndarray) -> None:
        n = sum(a.count for a in self.asks)
        bits = host[self._start: self._start + n * self.width].astype(np.int32)
        self._values = bits.view(np.float32).reshape(n, self.width)

    def result(self, handle: int, tokens: list[int]) -> list[TokenLogprob]:
        """The entries of one ask for its first len(tokens) rows (the tokens the request output)."""
        ask = self.asks[handle]
        first = sum(a.count for a in self.asks[:handle])
        rows = self._values[first: first + len(tokens)]
        k, width = ask.top, (self.width - 1) // 2
        out = []
        for token, row in zip(tokens, rows):
            top = [(int(t), float(v)) for t, v in zip(row[1 + width: 1 + width + k], row[1: 1 + k])]
            out.append(TokenLogprob(int(token), float(row[0]), top))
        return out
