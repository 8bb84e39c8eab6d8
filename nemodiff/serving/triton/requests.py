"""The Triton model's per-request state, and the rule that keeps asking about a request safe.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: model's request state]

Triton frees a request's response sender when its final response is sent, and asking a freed
sender whether the request was cancelled crashes the whole server. The watcher thread asks
(`cancelled`) and the engine thread claims the final response (`claim_final`) under one
per-request lock: once the final is claimed nobody asks again, and a final cannot be claimed
(so cannot be sent) while a question is under way. Kept free of Triton imports so it can be
tested without a server.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Choice:
    """One of a request's num_return_sequences sequences: what it still has to send."""

    index: int
    prefix: str = ""  # sent with its first response, then cleared
    first_response_sent: bool = False
    pending_ids: list[int] = field(default_factory=list)  # streamed ids whose text is still held back
    pending_logprobs: list = field(default_factory=list)  # their TokenLogprobs (return_log_probs)
    cum_logprob: float = 0.0  # of the tokens sent so far
    finished: bool = False


class RequestState:
    """One request in flight: where its responses go and what is still to be sent."""

    def __init__(self, sender, stream: bool, mode: str, num_input_tokens: int, echo_prefix: str,
                 key: str | None = None, n: int = 1):
        self.sender = sender
        self.key = key  # the HTTP front's tag of this request (control.FRONT_KEY), to cancel it by
        self.stream = stream
        self.mode = mode
        self.num_input_tokens = num_input_tokens
        self.choices = [Choice(index, echo_prefix) for index in range(n)]
        self.arrived = time.perf_counter()
        self.first_token_seen = False
        self.logprobs: int | None = None  # top alternatives per token when log-probabilities are returned
        self.handles: list = []  # the engine's handle of each choice, once submitted
        self.lock = threading.Lock()
        self.done = False  # the final response was claimed (it is sent, or about to be)

    @property
    def handle(self):
        """The first choice's engine handle (None until submitted)."""
        return self.handles[0] if self.handles else None

    def finish_choice(self, choice: Choice) -> bool:
        """Mark one choice finished; True when it was the last (its response is the request's final one)."""
        with self.lock:
            choice.finished = True
            return all(c.finished for c in self.choices)

    def claim_final(self) -> bool:
        """True for the one caller that may send the final response; waits for a cancellation question
        under way to be answered first."""
        with self.lock:
            if self.done:
                return False
            self.done = True
            return True

    def cancelled(self) -> bool:
        """Whether Triton reports the request cancelled (a closed stream or connection); False once
        its final response is claimed, without asking."""
        with self.lock:
            if self.done or not self.handles:
                return False
            try:
                return bool(self.sender.is_cancelled())
            except Exception:  # the request is gone on Triton's side
                return True

    def client_gone(self) -> bool:
        """Whether the client went away, asked before the request has a handle (True once the final is claimed)."""
        with self.lock:
            if self.done:
                return True
            try:
                return bool(self.sender.is_cancelled())
            except Exception:
                return True
