"""What a Dynamo request asks of nemodiff, and how nemodiff's answer goes back as Dynamo chunks.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: Dynamo's request dict ⇄ SamplingParams] ──▶ Dynamo

Dynamo's frontend tokenizes (chat template included), then hands the worker a dict: `token_ids`,
`stop_conditions`, `sampling_options`, `output_options` and `annotations` (the request's
`nvext.annotations`). Every field is read, or refused with one line naming it; none is dropped:
- read: max_tokens, min_tokens, ignore_eos, stop_token_ids (visible and hidden), stop strings (when
  the frontend forwards them), max_thinking_tokens, temperature, top_p, top_k, seed, logprobs,
  guided_decoding (json, regex, choice, grammar), and the annotation `decode_mode:<mode>`;
- refused (InvalidArgument): penalties (presence, frequency, repetition), min_p, beam search, best_of,
  length_penalty, n > 1, prompt_logprobs: the engine has no such thing, and a silent default
  would answer a different question than the one asked.
The frontend encodes a completion prompt without special tokens; `nemodiff generate --prompt` encodes
with them. The worker adds the tokenizer's leading special tokens (BOS) when a prompt lacks them, so
the same text gives the same ids, and a chat prompt (whose template writes BOS itself) is unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from nemodiff.runtime.request import MAX_TOP_LOGPROBS, Guide, SamplingParams, normalize_mode

MODE_ANNOTATION = "decode_mode:"
# sampling_options the engine cannot honour: a value other than these neutral ones is refused
UNSUPPORTED_SAMPLING = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                        "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0),
                        "use_beam_search": (None, False), "best_of": (None, 1), "length_penalty": (None, 1, 1.0)}
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length", "cancelled": "cancelled"}


class RequestError(ValueError):
    """A request field the worker cannot serve (becomes Dynamo's InvalidArgument: HTTP 400)."""


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text when it adds special tokens (BOS), [] if none."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    if len(full) > len(bare) and full[len(full) - len(bare):] == bare:
        return full[: len(full) - len(bare)]
    return []


def prompt_ids(token_ids: list[int], leading: list[int]) -> list[int]:
    """The prompt as `nemodiff generate --prompt` would encode it: the leading special ids added when missing."""
    ids = [int(t) for t in token_ids]
    if leading and ids[: len(leading)] != leading:
        return leading + ids
    return ids


def decode_mode(annotations: list[str] | None, default: str) -> str:
    """The `decode_mode:<mode>` annotation (its last one), else the worker's default mode."""
    mode = default
    for note in annotations or []:
        if isinstance(note, str) and note.startswith(MODE_ANNOTATION):
            mode = note[len(MODE_ANNOTATION):]
    try:
        return normalize_mode(mode)
    except ValueError as exc:
        raise RequestError(f"nvext.annotations {MODE_ANNOTATION}{mode}: {exc}") from None


def _guide(options: dict | None) -> Guide | None:
    if not options:
        return None
    given = {k: options.get(k) for k in ("json", "regex", "choice", "grammar") if options.get(k) is not None}
    if options.get("structural_tag") is not None:
        raise RequestError("guided_decoding.structural_tag is not supported by nemodiff (json, regex, choice, grammar are)")
    if len(given) > 1:
        raise RequestError(f"guided_decoding: give one of json, regex, choice, grammar (got {', '.join(given)})")
    if not given:
        return None
    (kind, value), = given.items()
    if kind == "json":
        if value in ({}, {"type": "object"}) and not isinstance(value, str):
            return Guide("json")
        return Guide("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise RequestError("guided_decoding.choice must be a list of strings")
        return Guide("choice", choices=tuple(value))
    return Guide("regex" if kind == "regex" else "ebnf_grammar", str(value))


def sampling_params(request: dict[str, Any], default_mode: str, max_seq_len: int, prompt_len: int,
                    eos_ids: list[int]) -> SamplingParams:
    """SamplingParams for one Dynamo request; RequestError names the field it cannot serve."""
    stop = request.get("stop_conditions") or {}
    sampling = request.get("sampling_options") or {}
    output = request.get("output_options") or {}
    for name, neutral in UNSUPPORTED_SAMPLING.items():
        if sampling.get(name) not in neutral:
            raise RequestError(f"{name}={sampling.get(name)!r} is not supported by nemodiff; leave it unset")
    if (sampling.get("n") or 1) != 1:
        raise RequestError(f"n={sampling.get('n')}: one choice per request through Dynamo (send n requests)")
    if output.get("prompt_logprobs") is not None:
        raise RequestError("prompt_logprobs is not supported by nemodiff; leave it unset")
    room = max(1, max_seq_len - prompt_len)
    max_tokens = stop.get("max_tokens")
    stop_ids = [int(t) for t in (stop.get("stop_token_ids") or []) + (stop.get("stop_token_ids_visible") or [])]
    # the frontend lists the card's EOS as hidden stop ids; the engine stops on its own EOS (ignore_eos aside)
    stop_ids += [int(t) for t in stop.get("stop_token_ids_hidden") or [] if int(t) not in eos_ids]
    logprobs = output.get("logprobs")
    if logprobs is not None and not 0 <= int(logprobs) <= MAX_TOP_LOGPROBS:
        raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {logprobs})")
    top_k = sampling.get("top_k")
    params = SamplingParams(
        max_new_tokens=int(max_tokens) if max_tokens is not None else room,
        min_tokens=int(stop.get("min_tokens") or 0), ignore_eos=bool(stop.get("ignore_eos") or False),
        stop=list(stop.get("stop") or []), stop_token_ids=sorted(set(stop_ids)),
        max_thinking_tokens=stop.get("max_thinking_tokens"),
        temperature=float(sampling["temperature"]) if sampling.get("temperature") is not None else 0.0,
        top_p=float(sampling["top_p"]) if sampling.get("top_p") is not None else 1.0,
        top_k=int(top_k) if top_k is not None and int(top_k) > 0 else 0,
        seed=sampling.get("seed"), logprobs=None if logprobs is None else int(logprobs),
        guide=_guide(sampling.get("guided_decoding")),
        mode=decode_mode(request.get("annotations"), default_mode),
    )
    try:
        return params.validate()
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def chunk(update, tokenizer=None) -> dict[str, Any]:
    """One Dynamo response chunk from an Update: its tokens, and their log-probabilities when asked."""
    out: dict[str, Any] = {"token_ids": list(update.token_ids), "index": 0}
    if update.logprobs:
        entries = [e for e in update.logprobs if e is not None]
        if len(entries) == len(update.token_ids):
            out["log_probs"] = [float(e.logprob) for e in entries]
            out["top_logprobs"] = [[{"rank": rank + 1, "token_id": int(t), "logprob": float(lp),
                                     **({"token": tokenizer.decode([int(t)], skip_special_tokens=False)}
                                        if tokenizer is not None else {})}
                                    for rank, (t, lp) in enumerate(e.top)] for e in entries]
    return out


def final_fields(update, prompt_len: int) -> dict[str, Any]:
    """The finish reason and usage (with the prompt tokens the prefix cache supplied) of a final chunk."""
    output = update.output
    completion = len(output.output_ids) if output is not None else 0
    cached = output.cached_prompt_tokens if output is not None else 0
    return {"finish_reason": FINISH_REASONS.get(update.finish_reason or "", "stop"),
            "completion_usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                                 "total_tokens": prompt_len + completion,
                                 "prompt_tokens_details": {"cached_tokens": cached}}}
