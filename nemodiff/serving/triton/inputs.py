"""Reading one Triton request's inputs into prompt ids and SamplingParams.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the nemodiff model's request parser]

The inputs are those of TensorRT-LLM's `tensorrt_llm_bls` model plus nemodiff's own
(`decode_mode`, `block_length`, `threshold`, `max_thinking_tokens`, `input_ids`, `timeout`,
`top_logprobs`, `min_tokens`, `logit_bias`: a JSON object of token ids and biases). `min_length`
is `min_tokens` (at most max_tokens). `return_log_probs` asks for log-probabilities, `num_return_sequences` for up to
the server's `max_n` sequences. Structured output comes in TensorRT-LLM's `guided_decoding_guide_type`
and `guided_decoding_guide`. `cache_salt` (a string, vLLM's name) names the request's tenant: prefix-cache
pages are shared only between requests with the same salt.
Inputs that Triton's OpenAI frontend and genai-perf send for features nemodiff does not
have are declared so those tools work, and refused only when they ask for something
(bad words, beam width > 1, ...). The penalties `repetition_penalty`, `frequency_penalty` and
`presence_penalty` (TensorRT-LLM's names) are read; `decode_mode` "auto" lets the engine pick per step.
Everything here raises `BadRequest` (answered with INVALID_ARG) and never touches the engine.

Images (VLM engines) come in the optional BYTES input `image_bytes_input`, one element per
image, in prompt order: the encoded file (PNG, JPEG, ...), the same base64-encoded (what a
JSON client of the HTTP generate endpoints can send), or a `data:` URL. The name is that of
the image input of TensorRT-LLM's multimodal Triton models; theirs carries UINT8 pixel arrays,
this one encoded images. Decoding and the image limits are the runtime's.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from nemodiff.runtime.request import (
    GUIDE_KINDS,
    MAX_CACHE_SALT,
    MAX_LOGIT_BIAS,
    MAX_TOP_LOGPROBS,
    PENALTIES,
    Guide,
    SamplingParams,
    normalize_mode,
    penalty_error,
)

DEFAULT_MAX_TOKENS = 64  # when a request has no max_tokens (capped by what the context has room for)
DEFAULT_THRESHOLD = 0.9
DEFAULT_MAX_N = 16  # most num_return_sequences (n) per request, unless the server says otherwise
INT32_MAX = 2**31 - 1
IMAGE_INPUT = "image_bytes_input"
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


class BadRequest(ValueError):
    """The request cannot run as given; answered with INVALID_ARG."""


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    timeout_s: float | None
    echo_prefix: str  # prepended to the first response's text (exclude_input_in_output = false)
    images: list[bytes] = field(default_factory=list)  # encoded images, in prompt order
    max_tokens_given: bool = True  # False: max_tokens is the default, to be refitted once images expand the prompt
    n: int = 1  # num_return_sequences: sequences sampled from the prompt, each its own responses


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("string inputs must be UTF-8") from None
    return str(value)


def _float(value) -> float:
    # FP32 inputs: take the shortest decimal that round-trips (0.9, not 0.8999999761581421)
    value = np.float32(value)
    if not np.isfinite(value):
        return float(value)
    return float(np.format_float_positional(value, unique=True))


def data_url_bytes(url: str) -> bytes:
    """The payload of a base64 `data:` URL (`data:image/png;base64,...`)."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:"):
        raise BadRequest("an image URL must be a data: URL (data:image/png;base64,...); remote URLs are not fetched")
    if not header.lower().endswith(";base64"):
        raise BadRequest("an image data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("an image data: URL has invalid base64 data") from None


def image_bytes(value) -> bytes:
    """One element of `image_bytes_input`: encoded image bytes, base64 text or a data: URL."""
    raw = value if isinstance(value, (bytes, bytearray)) else str(value).encode("utf-8")
    raw = bytes(raw)
    if raw[:5].lower() == b"data:":
        return data_url_bytes(raw.decode("ascii", "replace"))
    compact = b"".join(raw.split())
    if compact and len(compact) % 4 == 0 and _BASE64.fullmatch(compact):
        return base64.b64decode(compact)
    return raw


class RequestInputs:
    """Typed access to one request's input tensors (`get_tensor(name)` returns a numpy array or None)."""

    def __init__(self, get_tensor):
        self._get = get_tensor

    def array(self, name: str) -> np.ndarray | None:
        return self._get(name)

    def scalar(self, name: str, cast):
        array = self.array(name)
        if array is None or array.size == 0:
            return None
        if array.size != 1:
            raise BadRequest(f"{name} takes one value per request (got {array.size})")
        return cast(array.reshape(-1)[0])

    def strings(self, name: str) -> list[str]:
        array = self.array(name)
        return [] if array is None else [_text(v) for v in array.reshape(-1)]

    def nbytes(self, name: str) -> int:
        array = self.array(name)
        if array is None:
            return 0
        if array.dtype == np.object_:
            return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in array.reshape(-1))
        return int(array.nbytes)


class PromptTokenizer:
    """Tokenizes a prompt only as far as needed to know whether it fits.

    A token never covers more than `max_token_chars` characters, so a text longer than
    max_seq_len × max_token_chars cannot fit: only that much of it is tokenized to prove it.
    """

    def __init__(self, encode, vocab_tokens, max_seq_len: int):
        self.encode = encode
        self.max_seq_len = max_seq_len
        self.max_token_chars = max((len(t) for t in vocab_tokens), default=1) or 1

    def ids(self, text: str) -> list[int]:
        limit = self.max_seq_len * self.max_token_chars
        if len(text) > limit:
            head = self.encode(text[:limit])
            if len(head) >= self.max_seq_len:
                raise BadRequest(f"the prompt has more than {len(head)} tokens ({len(text)} characters); the "
                                 f"engine's max_seq_len is {self.max_seq_len} (prompt + max_tokens must fit)")
        return self.encode(text)


def _refuse_unsupported(inputs: RequestInputs) -> None:
    if any(inputs.strings("bad_words")):
        raise BadRequest("bad_words is not supported by nemodiff; leave it empty")
    value = inputs.scalar("beam_width", int)
    if value is not None and value != 1:
        raise BadRequest(f"beam_width must be 1: nemodiff does not run beam search (got {value})")
    for name in ("return_context_logits", "return_generation_logits"):
        if inputs.scalar(name, bool):
            raise BadRequest(f"{name} is not supported by nemodiff; leave it false")
    for name in ("embedding_bias_words",):
        if any(inputs.strings(name)):
            raise BadRequest(f"{name} is not supported by nemodiff; leave it empty (logit_bias takes token ids)")
    weights = inputs.array("embedding_bias_weights")
    if weights is not None and weights.size and np.any(weights != 0):
        raise BadRequest("embedding_bias_weights is not supported by nemodiff; leave it empty (logit_bias takes "
                         "token ids)")
    if inputs.scalar("lora_task_id", int):
        raise BadRequest("LoRA adapters per request are not supported by nemodiff (lora_task_id)")


def penalties_input(inputs: RequestInputs) -> dict[str, float]:
    """`repetition_penalty`, `frequency_penalty`, `presence_penalty` (TensorRT-LLM's names), range-checked."""
    values = {}
    for name in PENALTIES:
        value = inputs.scalar(name, _float)
        if value is not None:
            error = penalty_error(name, value)
            if error is not None:
                raise BadRequest(error)
            values[name] = value
    return values


def _logprobs_and_n(inputs: RequestInputs, max_n: int) -> tuple[int | None, int]:
    """(SamplingParams.logprobs, n) from return_log_probs, top_logprobs and num_return_sequences."""
    top = inputs.scalar("top_logprobs", int)
    wanted = bool(inputs.scalar("return_log_probs", bool))
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {top})")
    if top and not wanted:
        raise BadRequest("top_logprobs needs return_log_probs = true")
    n = inputs.scalar("num_return_sequences", int)
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise BadRequest(f"num_return_sequences must be in [1, {max_n}] (got {n}); the server's limit is its --max-n")
    return (top or 0) if wanted else None, n


def _min_tokens(inputs: RequestInputs, max_tokens: int) -> int:
    """`min_tokens` (nemodiff, vLLM's name) or `min_length` (TensorRT-LLM's): end-of-sequence, end_id and stop
    words cannot end the output before it. A min_length of max_tokens or more, as TensorRT-LLM takes it,
    makes the output exactly max_tokens long."""
    min_tokens, min_length = inputs.scalar("min_tokens", int) or 0, inputs.scalar("min_length", int) or 0
    if min_tokens < 0 or min_length < 0:
        raise BadRequest(f"min_tokens and min_length must be >= 0 (got {min(min_tokens, min_length)})")
    if min_tokens > max_tokens:
        raise BadRequest(f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})")
    return max(min_tokens, min(min_length, max_tokens))


def logit_bias_input(inputs: RequestInputs, vocab_size: int) -> dict[int, float] | None:
    """`logit_bias`: one JSON object of token id (a string, as OpenAI sends it) -> a number in [-100, 100]."""
    texts = inputs.strings("logit_bias")
    if len(texts) > 1:
        raise BadRequest("logit_bias takes one JSON object per request")
    if not texts or not texts[0].strip():
        return None
    try:
        value = json.loads(texts[0])
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadRequest('logit_bias must be a JSON object of token ids and numbers, e.g. {"50256": -100}')
    bias = {}
    for key, number in value.items():
        token = int(key) if key.isascii() and key.strip().isdigit() else -1
        if not 0 <= token < vocab_size:
            raise BadRequest(f"logit_bias keys must be token ids in [0, {vocab_size}) (got {key!r})")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
            raise BadRequest(f"logit_bias values must be numbers in [-100, 100] (got {number!r} for token {key})")
        bias[token] = float(number)
    return bias or None


def _cache_salt(inputs: RequestInputs) -> str | None:
    salts = inputs.strings("cache_salt")
    if len(salts) > 1:
        raise BadRequest("cache_salt takes one value per request")
    if salts and not 0 < len(salts[0]) <= MAX_CACHE_SALT:
        raise BadRequest(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters "
                         f"(got {len(salts[0])})")
    return salts[0] if salts else None


def guide_input(inputs: RequestInputs) -> Guide | None:
    """Structured output from `guided_decoding_guide_type` (json, json_schema, regex, choice, ebnf_grammar)
    and `guided_decoding_guide` (the schema, expression or grammar; for choice a JSON list of strings).
    Whether the guide compiles is checked when the request is admitted (the engine's grammars)."""
    kinds, texts = inputs.strings("guided_decoding_guide_type"), inputs.strings("guided_decoding_guide")
    kind = kinds[0].strip().lower() if kinds else ""
    text = texts[0] if texts else ""
    if len(kinds) > 1 or len(texts) > 1:
        raise BadRequest("guided_decoding_guide_type and guided_decoding_guide take one value per request")
    if not kind:
        if text:
            raise BadRequest("guided_decoding_guide needs guided_decoding_guide_type (one of "
                             f"{', '.join(GUIDE_KINDS)})")
        return None
    if kind not in GUIDE_KINDS:
        raise BadRequest(f"guided_decoding_guide_type must be one of {', '.join(GUIDE_KINDS)} (got {kind!r})")
    choices: tuple[str, ...] = ()
    if kind == "choice":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise BadRequest('a choice guide (guided_decoding_guide) must be a JSON list of non-empty strings, '
                             'e.g. ["yes", "no"]')
        choices, text = tuple(value), ""
    try:
        return Guide(kind, text, choices).validate()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def parse_request(inputs: RequestInputs, tokenizer: PromptTokenizer, decode, default_mode: str, vocab_size: int,
                  max_request_bytes: int, max_n: int = DEFAULT_MAX_N) -> ParsedRequest:
    size = sum(inputs.nbytes(name) for name in ("text_input", "input_ids", "stop_words", "bad_words"))
    if size > max_request_bytes:
        raise BadRequest(f"the request is too large ({size} bytes of prompt and word lists; the limit is "
                         f"{max_request_bytes})")
    max_seq_len = tokenizer.max_seq_len
    texts = inputs.strings("text_input")
    ids = inputs.array("input_ids")
    if ids is not None and ids.size:
        if ids.size >= max_seq_len:
            raise BadRequest(f"the prompt has {ids.size} tokens; the engine's max_seq_len is {max_seq_len} "
                             "(prompt + max_tokens must fit)")
        prompt_ids = [int(i) for i in ids.reshape(-1)]
    else:
        if len(texts) != 1:
            raise BadRequest(f"text_input takes one prompt per request (got {len(texts)})")
        prompt_ids = tokenizer.ids(texts[0])
    if len(prompt_ids) >= max_seq_len:
        raise BadRequest(f"the prompt has {len(prompt_ids)} tokens; the engine's max_seq_len is "
                         f"{max_seq_len} (prompt + max_tokens must fit)")
    max_tokens = inputs.scalar("max_tokens", int)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_seq_len - len(prompt_ids))
    elif max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1 (got {max_tokens})")
    _refuse_unsupported(inputs)
    logprobs, n = _logprobs_and_n(inputs, max_n)
    ignore_eos = bool(inputs.scalar("ignore_eos", bool))
    min_tokens = _min_tokens(inputs, max_tokens)
    stop_token_ids = []
    end_id = inputs.scalar("end_id", int)
    if end_id is not None:
        if not 0 <= end_id < vocab_size:
            raise BadRequest(f"end_id {end_id} is outside the vocabulary [0, {vocab_size})")
        stop_token_ids.append(end_id)
    modes = inputs.strings("decode_mode")
    try:
        mode = normalize_mode(modes[0]) if modes and modes[0].strip() else default_mode
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    threshold = inputs.scalar("threshold", _float)
    if threshold is None:
        threshold = DEFAULT_THRESHOLD
    elif not 0 < threshold <= 1:
        raise BadRequest(f"threshold must be in (0, 1] (got {threshold})")
    seed = inputs.scalar("random_seed", int)
    if seed is None:
        seed = inputs.scalar("seed", int)
    temperature, top_p, top_k = (inputs.scalar("temperature", _float), inputs.scalar("top_p", _float),
                                 inputs.scalar("top_k", int))
    timeout_s = inputs.scalar("timeout", _float)
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise BadRequest(f"timeout must be a positive number of seconds (got {timeout_s})")
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=0.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k, seed=seed,
        stop=[s for s in inputs.strings("stop_words") if s], stop_token_ids=stop_token_ids, mode=mode,
        block_length=inputs.scalar("block_length", int), threshold=threshold, ignore_eos=ignore_eos,
        max_thinking_tokens=inputs.scalar("max_thinking_tokens", int), logprobs=logprobs, guide=guide_input(inputs),
        min_tokens=min_tokens, logit_bias=logit_bias_input(inputs, vocab_size),
        cache_salt=_cache_salt(inputs),
        **penalties_input(inputs),
    )
    images = inputs.array(IMAGE_INPUT)
    images = [image_bytes(v) for v in images.reshape(-1)] if images is not None else []
    echo = inputs.scalar("exclude_input_in_output", bool) is False
    prefix = (texts[0] if texts and not (ids is not None and ids.size) else decode(prompt_ids)) if echo else ""
    return ParsedRequest(prompt_ids, params, bool(inputs.scalar("stream", bool)), timeout_s, prefix, images,
                         inputs.scalar("max_tokens", int) is not None, n)
