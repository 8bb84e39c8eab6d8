"""A thread-safe front for the engine: submit, stream, cancel, with the loop on its own thread.

checkpoint ──builder──▶ engine dir ──[runtime: serving API]──▶ Triton

Every engine call happens on the loop thread; other threads only enqueue commands and
receive `Update`s (through a callback, a blocking iterator or an async iterator). A bad
request fails alone: its error is delivered as its final update and the loop keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from .llm import LLM, RequestOutput
from .request import Request, SamplingParams
from .streaming import TextStream

log = logging.getLogger(__name__)


@dataclass
class Update:
    """What happened to one request since its previous update."""

    text_delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = None  # set on the final update
    error: str | None = None  # set when the request could not run
    error_kind: str | None = None  # "invalid" (the request's fault) or "internal" (the engine's)


@dataclass(eq=False)
class Handle:
    on_update: Callable[[Update], None]
    is_cancelled: Callable[[], bool] | None = None
    request: Request | None = None
    stream: TextStream | None = None
    sent_tokens: int = 0
    cancel_requested: bool = False


class AsyncEngine:
    def __init__(self, llm: LLM, idle_wait_s: float = 0.05):
        self.llm = llm
        self.engine = llm.engine
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, Handle] = {}
        self._idle_wait = idle_wait_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the snapshot read by metrics()
        self._thread = threading.Thread(target=self._loop, name="nemodiff-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread) -------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, on_update: Callable[[Update], None],
               is_cancelled: Callable[[], bool] | None = None) -> Handle:
        handle = Handle(on_update=on_update, is_cancelled=is_cancelled)
        self._commands.put(("submit", handle, list(prompt_ids), params))
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a request and free its pages; does nothing once it has finished."""
        if handle.request is not None and handle.request.finished:
            return
        handle.cancel_requested = True
        self._commands.put(("cancel", handle))

    def stream(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Iterator[Update]:
        updates: queue.Queue = queue.Queue()
        handle = self.submit(prompt_ids, params, updates.put)
        try:
            while True:
                update = updates.get(timeout=timeout)
                yield update
                if update.finished:
                    return
        finally:
            self.cancel(handle)  # a consumer that stops early frees the request

    async def astream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Update]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        handle = self.submit(prompt_ids, params, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        try:
            while True:
                update = await updates.get()
                yield update
                if update.finished:
                    return
        finally:
            self.cancel(handle)

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None) -> Update:
        """Block until the request ends; returns its final update."""
        updates = list(self.stream(prompt_ids, params, timeout=timeout))
        return updates[-1]

    def metrics(self) -> dict:
        with self._lock:
            scheduler = self.engine.scheduler
            return {
                "kv_cache_pages_used": self.engine.cache.num_used_pages,
                "kv_cache_pages_total": self.engine.cache.num_pages,
                "requests_running": len(scheduler.running),
                "requests_waiting": len(scheduler.waiting),
                "output_tokens": dict(self.engine.output_tokens),
                "forward_passes": dict(self.engine.forward_passes),
            }

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # -- loop thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_commands(block=not self.engine.has_unfinished())
            self._poll_cancellations()
            if not self.engine.has_unfinished():
                continue
            try:
                with self._lock:
                    self.engine.step()
            except Exception as exc:  # keep serving: fail what was running, not the server
                log.exception("engine step failed")
                for handle in list(self._handles.values()):
                    self._fail(handle, f"internal error during generation: {exc}")
                continue
            self._publish()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self, command: tuple) -> None:
        kind = command[0]
        if kind == "submit":
            _, handle, prompt_ids, params = command
            if handle.cancel_requested:
                return
            try:
                with self._lock:
                    handle.request = self.engine.add_request(prompt_ids, params)
            except ValueError as exc:
                handle.on_update(Update(finished=True, finish_reason="error", error=str(exc), error_kind="invalid"))
                return
            handle.stream = TextStream(handle.request)
            self._handles[handle.request.request_id] = handle
        elif kind == "cancel":
            handle = command[1]
            if handle.request is not None and not handle.request.finished:
                with self._lock:
                    self.engine.abort(handle.request)
                self._publish_one(handle)

    def _poll_cancellations(self) -> None:
        for handle in list(self._handles.values()):
            if handle.is_cancelled is not None and handle.is_cancelled():
                with self._lock:
                    self.engine.abort(handle.request)
                self._publish_one(handle)

    def _publish(self) -> None:
        for handle in list(self._handles.values()):
            if handle.request.finished or len(handle.request.output_ids) > handle.sent_tokens:
                self._publish_one(handle)

    def _publish_one(self, handle: Handle) -> None:
        request = handle.request
        tokens = request.output_ids[handle.sent_tokens:]
        handle.sent_tokens = len(request.output_ids)
        update = Update(text_delta=handle.stream.delta(), token_ids=list(tokens), finished=request.finished,
                        finish_reason=request.finish_reason)
        if request.finished:
            update.output = self.llm._output(request)
            self._handles.pop(request.request_id, None)
        self._deliver(handle, update)

    def _fail(self, handle: Handle, message: str) -> None:
        if handle.request is not None:
            self.engine.abort(handle.request, reason="error")
            self._handles.pop(handle.request.request_id, None)
        self._deliver(handle, Update(finished=True, finish_reason="error", error=message, error_kind="internal"))

    @staticmethod
    def _deliver(handle: Handle, update: Update) -> None:
        try:
            handle.on_update(update)
        except Exception:  # a broken client callback must not stop the loop
            log.exception("update callback failed")
