"""Token choice from logits: greedy, or temperature with top-k / top-p, seeded per request.

checkpoint ──builder──▶ engine dir ──[runtime: sampler]──▶ Triton

`distribution` gives the exact probabilities a sampled token is drawn from; the
speculative modes use it for rejection sampling, so AR and spec sample one distribution.
"""

from __future__ import annotations

import torch


def distribution(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., vocab] -> float64 probabilities after temperature, top-k and top-p filtering."""
    scaled = logits.double() / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> int:
    """One token from a [vocab] logits row."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    return draw(distribution(logits, temperature, top_k, top_p), generator)


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
