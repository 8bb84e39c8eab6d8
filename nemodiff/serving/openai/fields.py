"""Which OpenAI body fields the API reads, which it may ignore, and which it refuses.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: body fields]──▶ clients

parse.py and guided.py read the fields of `READ`. A field of `HARMLESS` does not change the output
(user, metadata, store, ...): it is accepted and ignored. A field of `REFUSED` would change the output
in a way nemodiff does not implement: a value other than its neutral one is a 400 naming it. Any other
field is unknown: ignored, and logged once per field name per server process, so that nothing a client
sends disappears without a trace.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

READ = frozenset({
    # both endpoints
    "model", "max_tokens", "stop", "stream", "stream_options", "n", "temperature", "top_p", "seed",
    "logit_bias", "response_format",
    # completions
    "prompt", "echo", "logprobs", "best_of", "suffix",
    # chat
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    # nemodiff's and vLLM's extra fields
    "decode_mode", "block_length", "threshold", "top_k", "max_thinking_tokens", "ignore_eos", "timeout",
    "min_tokens", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "cache_salt",
    # penalties (OpenAI's two and vLLM's repetition_penalty)
    "frequency_penalty", "presence_penalty", "repetition_penalty",
})

# accepted and ignored: they do not change what is generated
HARMLESS = {
    "user": "an end-user id for the provider's monitoring",
    "metadata": "tags for stored completions",
    "store": "whether the provider stores the completion",
    "service_tier": "the provider's latency tier",
    "parallel_tool_calls": "a forced tool call is one call",
    "prediction": "predicted output, a latency hint",
    "modalities": "text is the only output modality",
    "spaces_between_special_tokens": "special tokens are not part of the text",
    "request_id": "vLLM's request id",
    "priority": "vLLM's scheduling priority",
}


def _differs(neutral):
    return lambda value: value is not None and value != neutral


# field -> (does this value change the output?, why it is refused)
REFUSED = {
    "length_penalty": (_differs(1), "length_penalty is not supported (there is no beam search); leave it 1"),
    "bad_words": (lambda v: bool(v), "bad_words is not supported; use logit_bias -100 on their token ids"),
    "allowed_token_ids": (lambda v: v is not None, "allowed_token_ids is not supported; use logit_bias"),
    "stop_token_ids": (lambda v: bool(v), "stop_token_ids is not supported by the OpenAI API; use stop strings"),
    "prompt_logprobs": (lambda v: v is not None, "prompt_logprobs is not supported"),
    "min_p": (_differs(0), "min_p is not supported; leave it 0 or unset"),
    "top_a": (_differs(0), "top_a is not supported; leave it 0 or unset"),
    "use_beam_search": (lambda v: bool(v), "beam search is not supported"),
    "include_stop_str_in_output": (lambda v: bool(v), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": (lambda v: v is False, "special tokens are always left out of the text"),
    "truncate_prompt_tokens": (lambda v: v is not None, "truncate_prompt_tokens is not supported"),
    "add_generation_prompt": (lambda v: v is False, "the chat prompt always ends with the generation prompt"),
    "continue_final_message": (lambda v: bool(v), "continue_final_message is not supported"),
    "chat_template": (lambda v: v is not None, "the chat template is the engine's; chat_template is not supported"),
    "chat_template_kwargs": (lambda v: bool(v), "chat_template_kwargs is not supported"),
    "guided_decoding_backend": (lambda v: v not in (None, "xgrammar"), "the grammar engine is xgrammar"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "functions": (lambda v: bool(v), "functions is not supported; use tools"),
    "function_call": (lambda v: v not in (None, "none", "auto"), "function_call is not supported; use tool_choice"),
}

_logged: set[str] = set()
_lock = threading.Lock()


def refusal(body: dict) -> tuple[str, str] | None:
    """(field, message) of the first field that asks for what nemodiff does not do, else None."""
    for name in body.keys() & REFUSED.keys():
        changes, why = REFUSED[name]
        if changes(body[name]):
            return name, f"{why} (got {body[name]!r})"
    return None


def note_unknown(body: dict) -> list[str]:
    """Log each unknown field once per process; returns the unknown fields of this body."""
    unknown = sorted(name for name in body if name not in READ and name not in HARMLESS and name not in REFUSED)
    fresh = []
    if unknown:
        with _lock:
            fresh = [name for name in unknown if name not in _logged]
            _logged.update(fresh)
    for name in fresh:
        log.warning("ignoring the unknown OpenAI body field %r (logged once)", name)
    return unknown
