"""The OpenAI frontend's choices: n completions of one request, their log-probabilities and usage.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: choices and logprobs]──▶ clients

The model answers with responses (backend.Piece) of any of the request's choices, each tagged with
its index. Log-probabilities come as token ids with one value each and their alternatives; here they
take OpenAI's shapes: chat `logprobs.content` (token, logprob, bytes, top_logprobs), completions
`logprobs` (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset). A token's
string is the token id decoded alone by the engine's tokenizer, its bytes that string's UTF-8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nemodiff.serving.openai.backend import Piece

UNKNOWN_LOGPROB = -9999.0  # OpenAI's value for a log-probability it cannot give (no entry for the token)


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


class TokenStrings:
    """Token id -> its text decoded alone (cached: a vocabulary is small next to the tokens served)."""

    def __init__(self, decode):
        self._decode = decode
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode([token_id], skip_special_tokens=False)
        return text


def _value(logprob: float) -> float:
    return UNKNOWN_LOGPROB if math.isnan(logprob) else logprob


@dataclass
class ChoiceText:
    """What one choice has received so far."""

    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    content: list[dict] = field(default_factory=list)  # chat logprobs.content entries
    tokens: dict = field(default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                  "text_offset": []})  # completions logprobs
    offset: int = 0  # completions: where the next token's text starts


class Choices:
    """The choices of one request: chat or completions, with or without log-probabilities."""

    def __init__(self, n: int, chat: bool, strings: TokenStrings, logprobs: bool, offset: int = 0):
        self.chat = chat
        self.strings = strings
        self.logprobs = logprobs
        self.choices = [ChoiceText(i, offset=offset) for i in range(n)]
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    def add(self, piece: Piece) -> tuple[ChoiceText, dict | None]:
        """Take one response; returns its choice and the log-probabilities of its tokens in OpenAI's shape
        (None without log-probabilities)."""
        choice = self.choices[piece.index] if 0 <= piece.index < len(self.choices) else self.choices[0]
        if choice.index == 0:  # the prompt is counted once, as OpenAI does for n > 1
            self.prompt_tokens += piece.num_input_tokens
            self.cached_tokens = max(self.cached_tokens, piece.cached_tokens)
        self.completion_tokens += piece.num_output_tokens
        choice.text.append(piece.text)
        choice.finish_reason = piece.finish_reason or choice.finish_reason
        if not self.logprobs:
            return choice, None
        entries = self._entries(piece, choice)
        return choice, entries

    def _entries(self, piece: Piece, choice: ChoiceText) -> dict:
        values = piece.logprobs or []
        tops = piece.top or [[] for _ in values]
        if self.chat:
            content = []
            for token_id, value, top in zip(piece.token_ids, values, tops):
                token = self.strings(token_id)
                content.append({"token": token, "logprob": _value(value), "bytes": list(token.encode("utf-8")),
                                "top_logprobs": [{"token": (t := self.strings(i)), "logprob": _value(v),
                                                  "bytes": list(t.encode("utf-8"))} for i, v in top]})
            choice.content += content
            return {"content": content}
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, value, top in zip(piece.token_ids, values, tops):
            token = self.strings(token_id)
            part["tokens"].append(token)
            part["token_logprobs"].append(_value(value))
            part["top_logprobs"].append({self.strings(i): _value(v) for i, v in top})
            part["text_offset"].append(choice.offset)
            choice.offset += len(token)
        for key, values_ in part.items():
            choice.tokens[key] += values_
        return part

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def complete(self) -> list[dict]:
        """The choices of a non-streamed answer."""
        out = []
        for choice in self.choices:
            text = "".join(choice.text)
            if self.chat:
                entry = {"index": choice.index, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": choice.content} if self.logprobs else None}
            else:
                entry = {"index": choice.index, "text": text, "logprobs": choice.tokens if self.logprobs else None}
            out.append(entry | {"finish_reason": finish_reason(choice.finish_reason)})
        return out

    def chunk_choice(self, index: int, text: str | None, reason: str | None, logprobs: dict | None = None,
                     role: bool = False) -> dict:
        """One choice of a streamed chunk."""
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs}
        choice["finish_reason"] = finish_reason(reason) if reason is not None else None
        return choice
