"""uvicorn on a thread of `nemodiff serve`, with a deadline for each request to arrive.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[HTTP fronts: the server under them]──▶ clients

uvicorn closes a keep-alive connection that sends nothing, but not one that sends a few bytes
of a request and stalls: a thousand half-sent requests were held open for good. Here every
connection has `idle_timeout` seconds, from when it opened or its previous response completed,
to deliver a complete request (head and body); past that it is closed. A request that has
arrived may take as long as its answer takes (a response may stream for minutes).
On `stop()` the requests still open get a moment to finish; then each is answered with our
"shutting down" error (closing.py) before uvicorn exits, never cut off with its plain-text 500.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .closing import AnswerOnClose, triton_error

_WAITING_ON_CLIENT = (h11.IDLE, h11.SEND_BODY)
CLOSE_GRACE_S = 1.0  # for open requests to finish on their own when a front stops


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the deadline of the request being received."""

    request_timeout: float = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        self._cancel_deadline()  # the next request gets a deadline of its own
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _watch(self) -> None:
        if self.transport.is_closing():
            self._cancel_deadline()
        elif self.conn.their_state in _WAITING_ON_CLIENT:
            if self._deadline is None:
                self._deadline = self.loop.call_later(self.request_timeout, self._expired)
        else:
            self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state in _WAITING_ON_CLIENT and not self.transport.is_closing():
            self.transport.close()  # an app waiting for the rest of the body hears a disconnect


class ServerThread:
    """An ASGI app under uvicorn on a daemon thread (no signal handlers of its own: the supervisor has them).
    error_body(message): the app's JSON shape of an error, for the answers of `stop()`."""

    def __init__(self, app, host: str, port: int, idle_timeout: float, name: str,
                 error_body: Callable[[str], dict] = triton_error):
        protocol = type("DeadlineH11", (DeadlineH11Protocol,), {"request_timeout": idle_timeout})
        self.guard = app = AnswerOnClose(app, error_body)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http=protocol,
                                timeout_keep_alive=max(1, round(idle_timeout)), timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)  # off the main thread it installs no signal handlers
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{local}:{port}"
        self.name = name
        self._thread = threading.Thread(target=self.server.run, name=name, daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started:
                return
            if not self._thread.is_alive():
                break
            self._thread.join(0.05)
        raise RuntimeError(f"the {self.name} did not start on {self.url}")

    def stop(self, grace: float = CLOSE_GRACE_S) -> None:
        deadline = time.monotonic() + grace
        while self.guard.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        loop = self.guard.loop
        if self.guard.pending() and loop is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self.guard.close(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001  (the loop is gone: uvicorn answers what is left)
                pass
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
