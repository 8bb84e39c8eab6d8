"""Every request still open when a front stops gets our "shutting down" answer, never uvicorn's plain 500.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[HTTP fronts: answers at shutdown]──▶ clients

On shutdown `nemodiff serve` drains the model first, so normally every request has been answered
before a front stops. One that is still open then (its answer from Triton still in transit, or Triton
itself stuck) used to be cancelled by uvicorn's graceful-shutdown timeout: uvicorn answered it with a
plain-text `500 Internal Server Error`, and the app, unwinding, tried to start its own response and
logged `RuntimeError: Unexpected ASGI message 'http.response.start'`. `AnswerOnClose` wraps the app:
`close()` cancels each open request's task and answers it itself, once: a 503 with our JSON error (and
`Retry-After`) when its response has not started, a last server-sent event carrying the error when a
stream had begun, the end of the body otherwise. Whatever the app sends after that is dropped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from nemodiff.serving import errors


class _Open:
    def __init__(self, task: asyncio.Task | None):
        self.task = task
        self.started = False  # http.response.start was sent
        self.finished = False  # the last body message was sent
        self.event_stream = False
        self.closing: str | None = None  # the message it is answered with


def triton_error(message: str) -> dict:
    """The error body of Triton's HTTP endpoints (the HTTP front's)."""
    return {"error": message}


class AnswerOnClose:
    """ASGI middleware. error_body(message): the JSON body of an error answer in the app's own shape."""

    def __init__(self, app, error_body: Callable[[str], dict] = triton_error):
        self.app = app
        self.error_body = error_body
        self.loop: asyncio.AbstractEventLoop | None = None
        self._open: set[_Open] = set()

    def pending(self) -> int:
        """Requests whose answer has not been sent in full."""
        return sum(1 for state in list(self._open) if not state.finished)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.loop = asyncio.get_running_loop()
        state = _Open(asyncio.current_task())
        self._open.add(state)

        async def tracked(message: dict) -> None:
            if state.closing is not None:
                return  # answered by close(): the app's own messages are dropped
            if message["type"] == "http.response.start":
                state.started = True
                state.event_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                         for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state.finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except BaseException:  # noqa: BLE001  (cancelled by close(), or failing while it unwinds)
            if state.closing is None:
                raise
        finally:
            self._open.discard(state)
        if state.closing is not None and not state.finished:
            await self._answer(state, send)

    async def _answer(self, state: _Open, send) -> None:
        state.finished = True
        body = json.dumps(self.error_body(state.closing)).encode()
        try:
            if not state.started:
                await send({"type": "http.response.start", "status": 503, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(errors.RETRY_AFTER_S).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif state.event_stream:
                await send({"type": "http.response.body", "body": b"data: " + body + b"\n\n"})
            else:
                await send({"type": "http.response.body", "body": b""})
        except Exception:  # noqa: BLE001  (the client is gone already)
            pass

    async def close(self, message: str = errors.SHUTTING_DOWN, timeout: float = 3.0) -> None:
        """Answer every open request with `message` (see the module docstring); on the server's loop."""
        states = [state for state in list(self._open) if not state.finished and state.task is not None]
        for state in states:
            state.closing = message
            state.task.cancel()
        if states:
            await asyncio.wait([state.task for state in states], timeout=timeout)
