"""Per-request parameters, state and stop rules.

checkpoint ──builder──▶ engine dir ──[runtime: requests]──▶ Triton
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec")
MODE_ALIASES = {"fastdiffuser": "diffusion", "fast-diffuser": "diffusion", "linearspec": "linear-spec",
                "quadraticspec": "quadratic-spec", "autoregressive": "ar"}


def normalize_mode(mode: str) -> str:
    key = mode.strip().lower().replace("_", "-")
    key = MODE_ALIASES.get(key, key)
    if key not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(MODES)}")
    return key


@dataclass
class SamplingParams:
    """What to generate and how. Mirrors the CLI flags and the Triton inputs."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    mode: str = "ar"
    block_length: int | None = None  # diffusion/spec block (quadratic: draft length k)
    threshold: float | None = 0.9  # diffusion confidence threshold; None = top-k schedule
    draft_threshold: float | None = None  # linear-spec iterative drafting
    draft_lora: bool = True
    max_thinking_tokens: int | None = None

    def validate(self) -> "SamplingParams":
        self.mode = normalize_mode(self.mode)
        for name in ("temperature", "top_p", "threshold", "draft_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number (got {value!r})")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number (got {value})")
        for name in ("max_new_tokens", "top_k", "block_length", "max_thinking_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer (got {value!r})")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64) (got {self.seed})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] or None (got {self.threshold})")
        if self.draft_threshold is not None and not 0 < self.draft_threshold <= 1:
            raise ValueError(f"draft_threshold must be in (0, 1] or None (got {self.draft_threshold})")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length must be at least 1 (got {self.block_length})")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0 (got {self.max_thinking_tokens})")
        return self


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_text_len: int | None = None  # text is cut here when a stop string matched
    num_forwards: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    end_time: float | None = None
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        text = self.decode(self.output_ids)
        return text[: self.stop_text_len] if self.stop_text_len is not None else text

    def append(self, tokens: list[int]) -> list[int]:
        """Add newly decided tokens, applying stop rules; returns those actually kept."""
        kept = []
        for token in tokens:
            if self.finished:
                break
            self.output_ids.append(token)
            kept.append(token)
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            if (token in self.eos_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids:
                self._finish("eos" if token in self.eos_ids else "stop")
            elif self.params.stop and self._match_stop():
                self._finish("stop")
            elif len(self.output_ids) >= self.params.max_new_tokens:
                self._finish("length")
        return kept

    def _match_stop(self) -> bool:
        text = self.decode(self.output_ids)
        hits = [text.find(s) for s in self.params.stop if s and s in text]
        if hits:
            self.stop_text_len = min(hits)
            return True
        return False

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason
        self.end_time = time.perf_counter()
