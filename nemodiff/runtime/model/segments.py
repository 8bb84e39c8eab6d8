"""Segments: what one model forward computes for one request (docs/design.md §4).

checkpoint ──builder──▶ engine dir ──[runtime: strategy ▶ segments ▶ batch ▶ model]──▶ Triton

A strategy describes its next forward as segments; the batch builder packs the segments of
all requests into one ragged batch and the model returns, per segment, the logits of the rows
it asked for. Token ids, positions, write flags and logit rows may be lists or numpy arrays;
strategies on the hot path pass arrays and shared `Mask` objects so that describing a step
costs O(1) Python per request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


class Pattern(enum.IntEnum):
    CAUSAL = 0  # query j sees segment keys 0..j
    FULL = 1  # every query sees every segment key
    MASK = 2  # explicit [n, n] boolean mask (True = may attend), e.g. QuadraticSpec


class Mask:
    """An explicit intra-segment mask, with the packed bitmask the attention kernel reads.

    Bit j % 32 of int32 word j // 32 of row i says whether query i may see segment key j.
    """

    def __init__(self, dense: torch.Tensor):
        self.dense = dense.to(torch.bool).cpu()
        n = self.dense.shape[0]
        words = -(-n // 32)
        padded = torch.zeros(n, words * 32, dtype=torch.int64)
        padded[:, :n] = self.dense.to(torch.int64)
        weights = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).repeat(words)
        bits = (padded * weights).view(n, words, 32).sum(-1)
        self.bits = np.ascontiguousarray(bits.numpy().astype(np.uint32).view(np.int32).reshape(-1))
        self.key = (n, self.bits.tobytes())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape)


@lru_cache(maxsize=256)
def causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


@lru_cache(maxsize=256)
def full_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool)


@lru_cache(maxsize=512)
def arange(n: int) -> np.ndarray:
    values = np.arange(n, dtype=np.int64)
    values.flags.writeable = False
    return values


@dataclass(slots=True)
class Segment:
    request_id: int
    token_ids: list[int] | np.ndarray
    positions: list[int] | np.ndarray | None  # None: prefix_len + position_offsets
    prefix_len: int  # committed cache entries, all visible to every query
    pattern: Pattern = Pattern.CAUSAL
    write_kv: list[bool] | np.ndarray | bool = False  # per token, or one flag for all
    logit_rows: list[int] | np.ndarray | None = None  # rows whose logits are returned; None = all
    mask: torch.Tensor | Mask | None = None  # for Pattern.MASK
    use_lora: bool = False  # apply the draft adapter to this segment's tokens
    image_embeds: torch.Tensor | None = None  # [image-token positions, hidden]: replace those embeddings
    shape_key: tuple | None = None  # set by strategies for steady shapes that CUDA graphs may replay
    kv_end: int = -1  # one past the highest position written (strategies that know it save the search)
    # positions relative to prefix_len, kept by a strategy for its steady shape instead of positions: the
    # batch builder then places the positions of all such segments in one operation
    position_offsets: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.token_ids)
        if self.positions is None and self.position_offsets is None:
            raise ValueError("a segment needs positions or position offsets")
        if n != len(self.positions if self.positions is not None else self.position_offsets):
            raise ValueError("segment token_ids and positions differ in length")
        if not n:
            raise ValueError("empty segment")
        if self.pattern is Pattern.MASK:
            if self.mask is None or tuple(self.mask.shape) != (n, n):
                raise ValueError(f"Pattern.MASK needs a [{n}, {n}] boolean mask")
            if not isinstance(self.mask, Mask):
                self.mask = Mask(self.mask)

    def __len__(self) -> int:
        return len(self.token_ids)

    def moved(self, prefix_len: int, positions: list[int] | np.ndarray | None, kv_end: int) -> Segment:
        """This segment at another committed length, changed in place and returned: a strategy keeps
        one segment per steady shape (same length, pattern and mask, so nothing to check again) and
        moves it each step instead of building a new one (positions None: it has position offsets)."""
        self.prefix_len, self.positions, self.kv_end = prefix_len, positions, kv_end
        return self

    def write_end(self) -> int:
        """One past the highest position this segment writes to the cache (0 when it writes none)."""
        if self.kv_end >= 0:
            return self.kv_end
        if isinstance(self.write_kv, (bool, np.bool_)):
            return int(np.max(self.absolute_positions())) + 1 if self.write_kv else 0
        writes = np.asarray(self.write_kv, dtype=bool)
        return int(self.absolute_positions()[writes].max()) + 1 if writes.any() else 0

    def absolute_positions(self) -> np.ndarray:
        if self.positions is None:
            return self.position_offsets + self.prefix_len
        return np.asarray(self.positions)

    def rows(self) -> np.ndarray:
        return arange(len(self)) if self.logit_rows is None else np.asarray(self.logit_rows, dtype=np.int64)

    def intra_mask(self) -> torch.Tensor:
        n = len(self)
        if self.pattern is Pattern.CAUSAL:
            return causal_mask(n)
        if self.pattern is Pattern.FULL:
            return full_mask(n)
        return self.mask.dense


def quadratic_mask(k: int) -> torch.Tensor:
    """[k(k+1), k(k+1)] attention mask for k drafts followed by k groups of k masks."""
    n = k * (k + 1)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:k, :k] = torch.ones(k, k, dtype=torch.bool).tril()
    for i in range(k):
        rows = slice(k + i * k, k + (i + 1) * k)
        mask[rows, : i + 1] = True
        mask[rows, rows] = True
    return mask


def first_cycle_mask(prompt_len: int, k: int) -> torch.Tensor:
    """Prompt causal; k trailing masks see the whole prompt and each other; the prompt never sees them."""
    n = prompt_len + k
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[prompt_len:, prompt_len:] = True
    return mask


@lru_cache(maxsize=64)
def cycle_layout(k: int) -> tuple[Mask, np.ndarray, np.ndarray, np.ndarray]:
    """(mask, position offsets, write flags, logit rows) of a QuadraticSpec cycle, shared by all requests."""
    offsets = list(range(k))
    for i in range(k):
        offsets += range(i + 1, i + 1 + k)
    rows = list(range(k)) + [k + g * k + j for g in range(k) for j in range(1, k)]
    shared = np.array(offsets, dtype=np.int64), np.array([True] * k + [False] * (k * k)), np.array(rows, dtype=np.int64)
    for array in shared:
        array.flags.writeable = False  # one copy for every request
    return (Mask(quadratic_mask(k)),) + shared
