"""The output tensors of one response of the nemodiff Triton model, as named numpy arrays.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the nemodiff model's response tensors]

Names and types are TensorRT-LLM's where it has the output: `text_output`, `output_ids`,
`num_input_tokens`, `num_output_tokens`, `output_log_probs` (FP32, one per token of this response),
`cum_log_probs` (FP32, the sum over every token sent so far for this sequence), `num_cached_tokens`
(prompt tokens whose KV the prefix cache supplied, on a sequence's last response) and
`sequence_index` (INT32, which of num_return_sequences this response belongs to; sent whenever more
than one was asked). nemodiff's own: `num_forward_passes`, `finish_reason`, and with `top_logprobs`
K > 0 the K most likely tokens at each position, `output_top_log_probs` (FP32) and
`output_top_token_ids` (INT32), both shaped [1, tokens, K]. Kept free of Triton imports so it can be
tested without a server.
"""

from __future__ import annotations

import math

import numpy as np

from nemodiff.serving.triton.requests import Choice


def _row(values, dtype) -> np.ndarray:
    return np.array(values, dtype=dtype).reshape(1, -1)


def response_arrays(choice: Choice, text: str, ids: list[int], num_input_tokens: int, logprobs: list | None = None,
                    top: int | None = None, n: int = 1, output=None) -> list[tuple[str, np.ndarray]]:
    """The arrays of one response of `choice` carrying `text` and the tokens `ids` (with their TokenLogprobs
    when `top` is not None: the request asked for log-probabilities with `top` alternatives); `output`, the
    RequestOutput, on the sequence's last response. Updates the choice's running cumulative log-probability."""
    if not choice.first_response_sent:
        text, choice.prefix = choice.prefix + text, ""
    num_input = 0 if choice.first_response_sent else num_input_tokens
    choice.first_response_sent = True
    arrays = [("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
              ("output_ids", _row(ids, np.int32)), ("num_input_tokens", _row([num_input], np.int32)),
              ("num_output_tokens", _row([len(ids)], np.int32))]
    if top is not None:
        entries = list(logprobs or [])[: len(ids)]
        entries += [None] * (len(ids) - len(entries))
        values = [math.nan if e is None else e.logprob for e in entries]
        choice.cum_logprob += sum(v for v in values if not math.isnan(v))
        arrays += [("output_log_probs", _row(values, np.float32)), ("cum_log_probs", _row([choice.cum_logprob],
                                                                                          np.float32))]
        if top > 0:
            ids_k = np.full((1, len(ids), top), -1, dtype=np.int32)
            values_k = np.full((1, len(ids), top), math.nan, dtype=np.float32)
            for i, entry in enumerate(entries):
                for j, (token, value) in enumerate((entry.top if entry is not None else [])[:top]):
                    ids_k[0, i, j], values_k[0, i, j] = token, value
            arrays += [("output_top_log_probs", values_k), ("output_top_token_ids", ids_k)]
    if n > 1:
        arrays.append(("sequence_index", _row([choice.index], np.int32)))
    if output is not None:
        arrays += [("num_forward_passes", _row([output.num_forward_passes], np.int32)),
                   ("finish_reason", np.array([[output.finish_reason.encode()]], dtype=np.object_)),
                   ("num_cached_tokens", _row([output.cached_prompt_tokens], np.int32))]
    return arrays
