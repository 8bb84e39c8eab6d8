"""Segments: what one model forward computes for one request (DESIGN §4).

checkpoint ──builder──▶ engine dir ──[runtime: strategy ▶ segments ▶ model]──▶ Triton

A strategy describes its next forward as segments; the model runs the segments of all
requests in one ragged batch and returns, per segment, the logits of the rows it asked for.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Pattern(enum.Enum):
    CAUSAL = "causal"  # query j sees segment keys 0..j
    FULL = "full"  # every query sees every segment key
    MASK = "mask"  # explicit [n, n] boolean mask (True = may attend), e.g. QuadraticSpec


@dataclass
class Segment:
    request_id: int
    token_ids: list[int]
    positions: list[int]
    prefix_len: int  # committed cache entries, all visible to every query
    pattern: Pattern = Pattern.CAUSAL
    write_kv: list[bool] | bool = False  # per token, or one flag for all
    logit_rows: list[int] | None = None  # rows whose logits are returned; None = all
    mask: torch.Tensor | None = None  # for Pattern.MASK
    use_lora: bool = False  # apply the draft adapter to this segment's tokens
    # VLM prefill: one row per image-token position of this segment, in order; each row replaces
    # the token embedding there ([number of image tokens in the segment, hidden])
    image_embeds: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.token_ids) != len(self.positions):
            raise ValueError("segment token_ids and positions differ in length")
        if not self.token_ids:
            raise ValueError("empty segment")
        if self.pattern is Pattern.MASK:
            n = len(self.token_ids)
            if self.mask is None or tuple(self.mask.shape) != (n, n):
                raise ValueError(f"Pattern.MASK needs a [{n}, {n}] boolean mask")

    def __len__(self) -> int:
        return len(self.token_ids)

    def write_flags(self) -> list[bool]:
        if isinstance(self.write_kv, bool):
            return [self.write_kv] * len(self.token_ids)
        return list(self.write_kv)

    def rows(self) -> list[int]:
        return list(range(len(self))) if self.logit_rows is None else list(self.logit_rows)

    def intra_mask(self) -> torch.Tensor:
        n = len(self)
        if self.pattern is Pattern.CAUSAL:
            return torch.ones(n, n, dtype=torch.bool).tril()
        if self.pattern is Pattern.FULL:
            return torch.ones(n, n, dtype=torch.bool)
        return self.mask.to(torch.bool).cpu()
