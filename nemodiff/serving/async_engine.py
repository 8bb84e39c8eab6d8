"""A thread-safe front for the engine: submit, stream, cancel, with the loop on its own thread.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: the engine on its own thread] ──▶ clients

Every engine call happens on the loop thread; other threads only enqueue commands and
receive `Update`s (through a callback, a blocking iterator or an async iterator).

Guarantees, whatever fails:
- every request gets exactly one final update (finished=True), and nothing after it;
- a request that fails alone (bad input, or an error the engine pins on that request)
  gets an error while its neighbours go on;
- past the queue limit a request is refused at once (error_kind "unavailable");
- a request past its deadline ends with error_kind "timeout" and its pages are freed;
- if the loop itself fails, every pending request gets an "internal" error, later
  submissions are refused, `failure` says why and `on_failure` is called once: the
  process is expected to be restarted by its supervisor (`nemodiff serve` exits non-zero).

Images are decoded in the submitting thread (a bad one is an "invalid" error before the request is
queued); the vision tower runs on the loop, and grammars compile beside it (grammar_workers.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from nemodiff.runtime.images.pipeline import ImageInput, PreparedImages
from nemodiff.runtime.llm import LLM
from nemodiff.runtime.request import SamplingParams
from nemodiff.runtime.text.streaming import TextStream

from . import errors
from .grammar_workers import GrammarWorkers, Parked, client_gone
from .updates import Handle, Update, deliver, error_update

log = logging.getLogger(__name__)

class AsyncEngine:
    """The engine on a thread of its own.

    max_queue: requests allowed to wait beyond the running batch (None = no limit).
    request_timeout_s: deadline of every request from its submission (None = none); a
    request may ask for a shorter one.
    on_failure(message): called once, from the loop thread, after the loop failed and every
    pending request was answered.
    The AsyncEngine claims the LLM (`LLM.claim`): until `shutdown()`, `llm.generate` refuses
    instead of stepping the engine from a second thread.
    """

    def __init__(self, llm: LLM, idle_wait_s: float = 0.05, max_queue: int | None = None,
                 request_timeout_s: float | None = None, on_failure: Callable[[str], None] | None = None):
        self.llm = llm
        self.engine = llm.engine
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.capacity = None if max_queue is None else llm.max_batch_size + max_queue
        self.on_failure = on_failure
        self.failure: str | None = None  # why the loop stopped, once it failed
        self.closing: str | None = None  # why new requests are refused (draining or shut down)
        self.refused = 0  # requests refused at once (queue full, draining, failed)
        self.timed_out = 0
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, Handle] = {}  # loop thread only: requests added to the engine
        self._in_flight = 0  # submitted and not yet finished, guarded by _state_lock
        self._state_lock = threading.Lock()  # admission: in-flight count, failure and closing
        self._final_lock = threading.Lock()  # exactly one final update per handle
        self._idle_wait = idle_wait_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the snapshot read by metrics()
        self._compiles = GrammarWorkers(self._compile, self.engine.guide_limits.compile_timeout_s,
                                        lambda: self._commands.put(("wake",)))
        llm.claim("an AsyncEngine")
        self._thread = threading.Thread(target=self._supervise, name="nemodiff-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread) -------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, on_update: Callable[[Update], None],
               is_cancelled: Callable[[], bool] | None = None, timeout_s: float | None = None,
               images: list[ImageInput] | PreparedImages | None = None, leader: Handle | None = None) -> Handle:
        """Queue a request; refused at once (a final error update) when the server cannot take it.
        images: the prompt's images (paths, bytes, PIL images) or `Engine.prepare_images` of them.
        leader: an earlier choice of the same prompt (n > 1), whose prompt pages this one waits for and reuses."""
        if images is not None and not isinstance(images, PreparedImages):
            try:
                images = self.engine.prepare_images(prompt_ids, images, params)
            except ValueError as exc:
                handle = Handle(on_update=on_update, is_cancelled=is_cancelled)
                self._finish(handle, error_update(str(exc), "invalid"), counted=False)
                return handle
        timeouts = [t for t in (timeout_s, self.request_timeout_s) if t is not None]
        timeout = min(timeouts) if timeouts else None
        handle = Handle(on_update=on_update, is_cancelled=is_cancelled, timeout_s=timeout,
                        deadline=None if timeout is None else time.monotonic() + timeout)
        with self._state_lock:
            refusal = self._refusal()
            if refusal is None:
                self._in_flight += 1
                self._commands.put(("submit", handle, list(prompt_ids), params, images, leader))
            else:
                self.refused += 1
        if refusal is not None:
            self._finish(handle, error_update(refusal, "unavailable"), counted=False)
        return handle

    def _refusal(self) -> str | None:
        if self.failure is not None:
            return f"{errors.ENGINE_FAILED}: {self.failure}"
        if self.closing is not None:
            return self.closing
        if self.capacity is not None and self._in_flight >= self.capacity:
            return (f"{errors.AT_CAPACITY} ({self.llm.max_batch_size} running + {self.max_queue} queued "
                    "requests); retry later")
        return None

    def cancel(self, handle: Handle) -> None:
        """Stop a request, queued or running, and free its pages; does nothing once it has finished."""
        if handle.done:
            return
        handle.cancel_requested = True
        self._commands.put(("cancel", handle))

    def drain(self, message: str = errors.SHUTTING_DOWN) -> threading.Event:
        """Refuse new requests and end every pending one with an "unavailable" error; the returned
        event is set once all of them were answered."""
        done = threading.Event()
        with self._state_lock:
            self.closing = self.closing or message
        if self.failure is not None or not self._thread.is_alive():
            done.set()
        else:
            self._commands.put(("drain", message, done))
        return done

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    def stream(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None,
               images: list[ImageInput] | PreparedImages | None = None) -> Iterator[Update]:
        updates: queue.Queue = queue.Queue()
        handle = self.submit(prompt_ids, params, updates.put, images=images)
        try:
            while True:
                update = updates.get(timeout=timeout)
                yield update
                if update.finished:
                    return
        finally:
            self.cancel(handle)  # a consumer that stops early frees the request

    async def astream(self, prompt_ids: list[int], params: SamplingParams,
                      images: list[ImageInput] | PreparedImages | None = None) -> AsyncIterator[Update]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        handle = self.submit(prompt_ids, params, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u),
                             images=images)
        try:
            while True:
                update = await updates.get()
                yield update
                if update.finished:
                    return
        finally:
            self.cancel(handle)

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None,
                 images: list[ImageInput] | PreparedImages | None = None) -> Update:
        """Block until the request ends; returns its final update."""
        updates = list(self.stream(prompt_ids, params, timeout=timeout, images=images))
        return updates[-1]

    def metrics(self) -> dict:
        with self._lock:
            scheduler = self.engine.scheduler
            snapshot = {
                "kv_cache_pages_used": self.engine.cache.num_used_pages,
                "kv_cache_pages_total": self.engine.cache.num_pages,
                "requests_running": len(scheduler.running),
                "requests_waiting": len(scheduler.waiting),
                "output_tokens": dict(self.engine.output_tokens), "forward_passes": dict(self.engine.forward_passes),
                "auto_mode_steps": dict(self.engine.auto.steps),
                "prefix_cache_queries": scheduler.prefix_queries, "prefix_cache_hits": scheduler.prefix_hits,
            } | self.engine.image_stats()
        with self._state_lock:
            snapshot |= {"requests_in_flight": self._in_flight, "requests_refused": self.refused,
                         "requests_timed_out": self.timed_out + self._compiles.timed_out, "engine_healthy": int(self.healthy)}
        return snapshot

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; whatever is still pending gets an "unavailable" error."""
        with self._state_lock:
            self.closing = self.closing or errors.SHUTTING_DOWN
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)
        self._answer_everything(errors.SHUTTING_DOWN, "unavailable")
        self._compiles.close()
        if not self._thread.is_alive():
            self.llm.release()  # nobody steps the engine any more: generate() may

    # -- loop thread -------------------------------------------------------------------------
    def _supervise(self) -> None:
        try:
            self.llm.platform.bind_thread()  # this thread steps the engine: its device and stream, for good
            while not self._stop.is_set():
                self._iterate()
        except BaseException as exc:  # the loop is dead: answer everyone, refuse the rest, tell the owner
            log.exception("the engine loop failed")
            message = f"{type(exc).__name__}: {exc}"
            with self._state_lock:
                self.failure = message
            self._answer_everything(errors.internal(f"the engine stopped: {message}"), "internal")
            if self.on_failure is not None:
                try:
                    self.on_failure(message)
                except Exception:
                    log.exception("on_failure callback failed")

    def _iterate(self) -> None:
        idle = not self.engine.has_unfinished()
        if idle:
            self._publish()  # the last step's results, before waiting for work
        self._drain_commands(block=idle)
        self._poll_cancellations()
        self._expire_deadlines()
        self._compiles.settle(self._finish, self._admit_parked)
        if not self.engine.has_unfinished():
            return
        with self._lock:
            pending = self.engine.launch()
        # While the device runs step n, the host publishes step n-1 (detokenization, responses) and
        # takes new commands (admission into the waiting queue, cancellations).
        self._publish()
        self._drain_commands(block=False)
        if pending is not None:
            with self._lock:
                self.engine.complete(pending)

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
            _, handle, prompt_ids, params, images, leader = command
            if handle.cancel_requested:
                self._finish(handle, Update(finished=True, finish_reason="cancelled"))
                return
            if self.closing is not None:
                self._finish(handle, error_update(self.closing, "unavailable"))
                return
            grammar = None if params.guide is None else self.engine.cached_grammar(params.guide)
            if params.guide is not None and grammar is None:
                try:
                    self.engine.validate(prompt_ids, params)  # the guide's size limits, before any compile
                except ValueError as exc:
                    self._finish(handle, error_update(str(exc), "invalid"))
                    return
                self._compiles.park(handle, params.guide, command)
                return
            self._admit(command, grammar)
        elif kind == "cancel":
            handle = command[1]
            if handle.request is not None and not handle.done:
                self._abort(handle, "cancelled")
                self._publish_one(handle)
        elif kind == "drain":
            _, message, done = command
            for handle in list(self._handles.values()):
                self._abort(handle, "error")
                self._finish(handle, error_update(message, "unavailable"))
            for handle in self._compiles.take_all():
                self._finish(handle, error_update(message, "unavailable"))
            done.set()

    def _admit(self, command: tuple, grammar) -> None:
        """Add a submitted request to the engine (with its compiled grammar when it is guided)."""
        _, handle, prompt_ids, params, images, leader = command
        try:
            with self._lock:
                handle.request = self.engine.add_request(
                    prompt_ids, params, images, leader=leader.request if leader is not None else None,
                    grammar=grammar)
        except ValueError as exc:
            self._finish(handle, error_update(str(exc), "invalid"))
            return
        handle.stream = TextStream(handle.request)
        self._handles[handle.request.request_id] = handle

    # -- guided requests waiting for their grammar (grammar_workers.py) ------------------------
    def _compile(self, guide):
        return self.engine.grammars().compile(guide)  # a worker thread

    def _admit_parked(self, parked: Parked) -> None:
        if self.closing is not None:
            self._finish(parked.handle, error_update(self.closing, "unavailable"))
        else:
            self._admit(parked.command, parked.job.grammar)


    def _abort(self, handle: Handle, reason: str) -> None:
        self._handles.pop(handle.request.request_id, None)
        with self._lock:
            self.engine.abort(handle.request, reason)

    def _poll_cancellations(self) -> None:
        for handle in list(self._handles.values()):
            if handle.is_cancelled is not None and client_gone(handle):
                self._abort(handle, "cancelled")
                self._publish_one(handle)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for handle in list(self._handles.values()):
            if handle.deadline is not None and now >= handle.deadline:
                self._abort(handle, "error")
                with self._state_lock:
                    self.timed_out += 1
                self._finish(handle, error_update(
                    f"{errors.TIMED_OUT}: the request ran longer than its {handle.timeout_s:g} s deadline",
                    "timeout"))

    def _publish(self) -> None:
        for handle in list(self._handles.values()):
            if handle.request.finished or len(handle.request.output_ids) > handle.sent_tokens:
                self._publish_one(handle)

    def _publish_one(self, handle: Handle) -> None:
        request = handle.request
        if request.finish_reason == "error":  # the engine ended this request alone, with its own error
            self._handles.pop(request.request_id, None)
            message = getattr(request, "error", None) or "internal error during generation"
            self._finish(handle, error_update(errors.internal(str(message)), "internal"))
            return
        try:
            tokens = request.output_ids[handle.sent_tokens:]
            logprobs = None if request.logprobs is None else request.logprobs[handle.sent_tokens: len(request.output_ids)]
            update = Update(text_delta=handle.stream.delta(), token_ids=list(tokens), finished=request.finished,
                            finish_reason=request.finish_reason, logprobs=logprobs)
            if request.finished:
                update.output = self.llm._output(request)
        except Exception as exc:  # this request's output could not be built: it fails alone
            log.exception("building an update failed")
            if not request.finished:
                self._abort(handle, "error")
            self._handles.pop(request.request_id, None)
            self._finish(handle, error_update(errors.internal(f"while streaming the output: {exc}"), "internal"))
            return
        handle.sent_tokens = len(request.output_ids)
        if request.finished:
            self._handles.pop(request.request_id, None)
            self._finish(handle, update)
        else:
            deliver(handle, update)

    # -- delivery (exactly one final update) -------------------------------------------------
    def _finish(self, handle: Handle, update: Update, counted: bool = True) -> None:
        with self._final_lock:
            if handle.done:
                return
            handle.done = True
        if counted:
            with self._state_lock:
                self._in_flight -= 1
        deliver(handle, update)

    def _answer_everything(self, message: str, kind: str) -> None:
        """End every pending request, queued or running; safe from any thread once the loop has stopped."""
        pending = list(self._handles.values()) + self._compiles.take_all()
        self._handles.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "submit":
                pending.append(command[1])
            elif command[0] == "drain":
                command[2].set()
        for handle in pending:
            if handle.request is not None and not handle.request.finished:
                try:
                    with self._lock:
                        self.engine.abort(handle.request, "error")
                except Exception:
                    log.exception("abort failed")
            self._finish(handle, error_update(message, kind))
