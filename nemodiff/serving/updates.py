"""What a request served by an AsyncEngine hears: its updates, and the handle that carries them.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: request updates] ──▶ clients
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from nemodiff.runtime.llm import RequestOutput
from nemodiff.runtime.request import Request
from nemodiff.runtime.text.streaming import TextStream

from .errors import KINDS

log = logging.getLogger(__name__)

ERROR_KINDS = KINDS  # one of them is an Update's error_kind


@dataclass
class Update:
    """What happened to one request since its previous update."""

    text_delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # a TokenLogprob per token of token_ids when the request asks for them
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = None  # set on the final update of a request that ran
    error: str | None = None  # set when the request could not run or failed
    error_kind: str | None = None  # one of ERROR_KINDS


def error_update(message: str, kind: str) -> Update:
    return Update(finished=True, finish_reason="error", error=message, error_kind=kind)


@dataclass(eq=False)
class Handle:
    on_update: Callable[[Update], None]
    is_cancelled: Callable[[], bool] | None = None
    deadline: float | None = None  # time.monotonic() past which the request is ended
    timeout_s: float | None = None
    request: Request | None = None
    stream: TextStream | None = None
    sent_tokens: int = 0
    cancel_requested: bool = False
    done: bool = False  # the final update was delivered


def deliver(handle: Handle, update: Update) -> None:
    """Hand an update to its request's callback; a broken callback must not stop the loop."""
    try:
        handle.on_update(update)
    except Exception:  # a broken client callback must not stop the loop
        log.exception("update callback failed")
