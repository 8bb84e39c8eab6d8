"""Per-request parameters, state and stop rules.

checkpoint ──builder──▶ engine dir ──[runtime: requests]──▶ Triton

`Request.append` takes a step's new tokens at once: end-of-sequence ids and the token limit
are found with set and slice operations, and stop strings are matched on the tail of the
incrementally decoded text, so a step costs O(new tokens) whatever the output length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nemodiff.runtime.text.detokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from nemodiff.runtime.images.pipeline import RequestImages

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_CACHE_SALT = 1024  # characters of a cache_salt
MODES = ("ar", "diffusion", "linear-spec", "quadratic-spec", "auto")
MODE_ALIASES = {"fastdiffuser": "diffusion", "fast-diffuser": "diffusion", "linearspec": "linear-spec",
                "quadraticspec": "quadratic-spec", "autoregressive": "ar"}
# "auto": the engine picks among these per request and per step (they all give AR's output; diffusion never)
AUTO_MODES = ("ar", "linear-spec", "quadratic-spec")
# penalties (vLLM's rules): name -> (neutral value, lowest, highest, whether the lowest is allowed)
PENALTIES = {"repetition_penalty": (1.0, 0.0, 10.0, False), "frequency_penalty": (0.0, -2.0, 2.0, True),
             "presence_penalty": (0.0, -2.0, 2.0, True)}


def penalty_error(name: str, value) -> str | None:
    """Why `value` is not a valid `name` (one of PENALTIES), or None."""
    _, low, high, closed = PENALTIES[name]
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (low <= value if closed else low < value) and value <= high
    return None if ok else f"{name} must be a number in {'[' if closed else '('}{low:g}, {high:g}] (got {value!r})"


def normalize_mode(mode: str) -> str:
    key = mode.strip().lower().replace("_", "-")
    key = MODE_ALIASES.get(key, key)
    if key not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(MODES)}")
    return key


def mode_param(many: bool = False):
    """The click parameter type of a decode mode (`many`: a comma-separated list) that takes every spelling
    `normalize_mode` takes (linear_spec, fastdiffuser, ...) and passes on the canonical name(s), so that the
    command line accepts what the Python API and the servers accept."""
    import click  # the command lines' dependency, imported only by them

    class ModeChoice(click.Choice):
        def __init__(self):
            super().__init__(MODES)
            self.name = "mode list" if many else "mode"

        def get_metavar(self, param, ctx=None) -> str:
            return f"[{'|'.join(MODES)}]" + (",..." if many else "")

        def convert(self, value, param, ctx):
            try:
                return ",".join(normalize_mode(v) for v in str(value).split(",")) if many else normalize_mode(value)
            except (ValueError, AttributeError) as exc:
                self.fail(f"{exc} (underscores and the aliases {', '.join(MODE_ALIASES)} are accepted too)", param, ctx)

    return ModeChoice()


GUIDE_KINDS = ("json", "json_schema", "regex", "choice", "ebnf_grammar")  # TensorRT-LLM's guide type names


@dataclass(frozen=True)
class Guide:
    """Structured output: what the output must match (docs/design.md §12).

    kind: "json" (any JSON object), "json_schema" (text: a JSON schema), "regex" (text: a regular
    expression), "choice" (choices: one of these strings), "ebnf_grammar" (text: a GBNF grammar).
    """

    kind: str
    text: str = ""
    choices: tuple[str, ...] = ()

    def validate(self) -> "Guide":
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"guide kind must be one of {', '.join(GUIDE_KINDS)} (got {self.kind!r})")
        if not isinstance(self.text, str):
            raise ValueError(f"the {self.kind} guide must be a string")
        if self.kind == "choice" and (not self.choices or not all(isinstance(c, str) and c for c in self.choices)):
            raise ValueError("a choice guide needs a non-empty list of non-empty strings")
        if self.kind in ("json_schema", "regex", "ebnf_grammar") and not self.text.strip():
            raise ValueError(f"the {self.kind} guide is empty")
        return self


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
    logprobs: int | None = None  # per output token its log-probability and this many alternatives (0..20)
    n: int = 1  # completions of the prompt (LLM.generate and the servers fan them out)
    guide: Guide | None = None  # structured output: the output must match it
    guided_drafts: bool = True  # spec modes under a guide, temperature 0: drafts built under the grammar too
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before every decision
    min_tokens: int = 0  # end-of-sequence, stop_token_ids and stop strings cannot end the output earlier
    # tenants: prefix-cache pages are shared only between requests with the same salt (None: its own tenant)
    cache_salt: str | None = None
    # penalties, vLLM's rules (docs/design.md §5.6): on each logit row before logit_bias and every decision
    repetition_penalty: float = 1.0  # tokens of the prompt or output: positive logits / it, negative ones * it
    frequency_penalty: float = 0.0  # minus it times the token's count in the output
    presence_penalty: float = 0.0  # minus it once for a token in the output

    def validate(self) -> "SamplingParams":
        self.mode = normalize_mode(self.mode)
        for name in ("temperature", "top_p", "threshold", "draft_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number (got {value!r})")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number (got {value})")
        for name in ("max_new_tokens", "top_k", "block_length", "max_thinking_tokens", "seed", "logprobs", "n",
                     "min_tokens"):
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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {self.logprobs})")
        if self.n < 1:
            raise ValueError(f"n must be at least 1 (got {self.n})")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens = {self.max_new_tokens}] "
                             f"(got {self.min_tokens})")
        self._validate_bias()
        self._validate_salt()
        for name in PENALTIES:
            error = penalty_error(name, getattr(self, name))
            if error is not None:
                raise ValueError(error)
        if self.guide is not None:
            if not isinstance(self.guide, Guide):
                raise ValueError(f"guide must be a Guide (got {type(self.guide).__name__})")
            self.guide.validate()
            if self.max_thinking_tokens is not None:
                raise ValueError("max_thinking_tokens cannot be combined with a guide: the end-of-thinking token "
                                 "it forces is not part of the guide's grammar")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with a guide: the guide's grammar may end "
                                 "before it, and its end is an end-of-sequence token")
        return self

    def _validate_salt(self) -> None:
        salt = self.cache_salt
        if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT):
            raise ValueError(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters "
                             f"(got {type(salt).__name__} of length {len(salt) if isinstance(salt, str) else '-'})")

    def _validate_bias(self) -> None:
        """logit_bias: token id -> a finite number in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (the ids' range is
        the engine's vocabulary, checked at admission); an empty mapping is none."""
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must map token ids to numbers (got {type(bias).__name__})")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids, integers >= 0 (got {token!r})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}] "
                                 f"(got {value!r} for token {token})")
        self.logit_bias = {int(t): float(v) for t, v in bias.items()} or None

    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice `index` of n: one completion each, its own seed derived from the
        request's (the same seed and index give the same choice; at temperature 0 all choices agree)."""
        seed = self.seed
        if seed is not None and index:
            seed = int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little") >> 2
        return dataclasses.replace(self, n=1, seed=seed)


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
    error: str | None = None  # why the request failed (finish_reason "error")
    stop_text_len: int | None = None  # text is cut here when a stop string matched
    num_forwards: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    end_time: float | None = None
    stats: dict = field(default_factory=dict)
    images: RequestImages | None = None  # the prompt's images (VLM), until the request ends
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list | None = None  # TokenLogprob per output token when the request asks for them
    choice_index: int = 0  # which of its prompt's n choices this is
    grammar: object | None = None  # the guide's matcher (nemodiff/runtime/decoding/grammar.py), standing after output_ids
    penalty_counts: object | None = None  # the penalties' token counts (nemodiff/runtime/decoding/bias.py)

    def __post_init__(self):
        self.detokenizer = IncrementalDetokenizer(self.decode, self.output_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        self._final_text: str | None = None
        self._stop_floor: int | None = None  # text length before which no stop string counts (min_tokens)
        stop_ids = frozenset(self.params.stop_token_ids)
        self._stop_ids = stop_ids if self.params.ignore_eos else stop_ids | self.eos_ids

    @property
    def text(self) -> str:
        """The output text (decoded once in full when the request has finished)."""
        if not self.finished:
            self.detokenizer.update()
            return self.detokenizer.text
        if self._final_text is None:
            text = self.decode(self.output_ids)
            self._final_text = text[: self.stop_text_len] if self.stop_text_len is not None else text
        return self._final_text

    def image_embeds_for(self, start: int, end: int):
        """Image feature rows for the prompt positions [start, end) of a prefill or re-fill segment."""
        return None if self.images is None else self.images.embeds_for(start, end)

    def prefix_key(self, first: int, end: int) -> bytes:
        """What besides the token ids names positions [first, end) in the prefix cache (images)."""
        return b"" if self.images is None else self.images.prefix_key(first, end)

    def stop_ids(self) -> frozenset[int]:
        """Token ids that end the request (end-of-sequence unless ignored, and stop_token_ids)."""
        return self._stop_ids

    def append(self, tokens: list[int], logprobs: list | None = None) -> list[int]:
        """Add newly decided tokens (and their log-probabilities), applying stop rules; returns those
        actually kept."""
        if self.finished or not tokens:
            return []
        reason, end = None, len(tokens)
        room = self.params.max_new_tokens - len(self.output_ids)
        if room <= end:
            reason, end = "length", room
        stops, head = self.stop_ids(), tokens[:end]
        limit = end  # tokens that may complete a stop string (a stop-id token never does)
        if not stops.isdisjoint(head):
            first = min(head.index(t) for t in stops.intersection(head))
            reason, end, limit = ("eos" if tokens[first] in self.eos_ids else "stop"), first + 1, first
        if self.params.stop and limit > 0 and len(self.output_ids) + limit >= self.params.min_tokens:
            hit = self._stop_string_end(tokens, limit)
            if hit is not None:
                reason, end = "stop", hit
        kept = tokens[:end]
        if self.logprobs is not None:
            self.logprobs += (logprobs or [])[: len(kept)]
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.extend(kept)
        if reason is not None:
            self._finish(reason)
        return kept

    def _stop_string_end(self, tokens: list[int], limit: int) -> int | None:
        """How many of `tokens` to keep so the output ends with the first stop string they complete."""
        detok = self.detokenizer
        detok.update()
        start = max(len(detok.text) - max(len(s) for s in self.params.stop) + 1, 0)
        before = self.decode(self.output_ids[detok.prefix: detok.read]) if detok.read > detok.prefix else ""
        after = self.decode(self.output_ids[detok.prefix:] + tokens[:limit])
        tail = (detok.text + after[len(before):])[start:]
        if not any(s and s in tail for s in self.params.stop):
            return None
        floor = self._min_text_len(tokens)
        for count in range(1, limit + 1):  # rare (once per request): find the token that completed it
            if len(self.output_ids) + count < self.params.min_tokens:
                continue
            text = self.decode(self.output_ids + tokens[:count])
            hits = [text.find(s, max(start, floor - len(s) + 1)) for s in self.params.stop if s]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.stop_text_len = min(hits)
                return count
        return None

    def _min_text_len(self, tokens: list[int]) -> int:
        """With min_tokens: the length of the text of the first min_tokens - 1 output tokens. A stop string
        counts only when it ends after it, so it cannot end the output before min_tokens tokens."""
        need = self.params.min_tokens - 1
        if need <= 0:
            return 0
        if self._stop_floor is None:
            self._stop_floor = len(self.decode((self.output_ids + tokens)[:need]))
        return self._stop_floor

    def fail(self, message: str) -> None:
        self.error = message
        self._finish("error")

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason
        self.end_time = time.perf_counter()
