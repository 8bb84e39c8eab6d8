"""Reference draft choice and verification for one request (docs/design.md §5.3–5.5).

checkpoint ──builder──▶ engine dir ──[runtime: spec acceptance, reference]──▶ Triton

The engine decides for all requests at once (`nemodiff/runtime/decoding/decision_kinds.py`); these one-request
functions state the same rules plainly and are what the batched code is tested against.

Greedy: accept the longest run where the verifier's argmax equals the draft, plus one
bonus token. Sampling: standard speculative rejection sampling — accept draft d with
probability min(1, p(d) / q(d)), on rejection draw from normalise(max(p - q, 0)) — so the
output follows the AR sampling distribution exactly.
"""

from __future__ import annotations

import torch

from nemodiff.runtime.decoding.reference_sampler import distribution, draw
from nemodiff.runtime.request import SamplingParams


def verify(target_logits: torch.Tensor, drafts: list[int], draft_logits: torch.Tensor | None,
           params: SamplingParams, generator: torch.Generator) -> list[int]:
    """target_logits [m, vocab] are the verifier's predictions a_0..a_{m-1}; drafts are d_1..d_{m-1}
    (a_i is checked against d_{i+1}); draft_logits [m-1, vocab] the rows the drafts were drawn from.

    Returns the output tokens: the accepted drafts followed by one bonus (or resampled) token.
    """
    m = target_logits.shape[0]
    if len(drafts) != m - 1:
        raise ValueError(f"verify wants {m - 1} drafts for {m} target rows, got {len(drafts)}")
    if params.temperature <= 0:
        predictions = target_logits.argmax(dim=-1).tolist()
        n = 1
        while n < m and predictions[n - 1] == drafts[n - 1]:
            n += 1
        return predictions[:n]
    p_all = distribution(target_logits, params.temperature, params.top_k, params.top_p)
    q_all = distribution(draft_logits, params.temperature, params.top_k, params.top_p) if m > 1 else None
    out = []
    for i, draft in enumerate(drafts):
        p, q = p_all[i], q_all[i]
        u = torch.rand((), generator=generator, dtype=torch.float64)
        if q[draft] > 0 and u * q[draft] < p[draft]:
            out.append(draft)
            continue
        residual = (p - q).clamp(min=0)
        out.append(draw(residual / residual.sum() if residual.sum() > 0 else p, generator))
        return out
    out.append(draw(p_all[m - 1], generator))
    return out
