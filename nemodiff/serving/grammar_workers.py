"""Grammar compilation beside the engine loop: no structured-output request stalls the others.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: grammar workers beside the engine thread] ──▶ clients

A guided request reaches `AsyncEngine` with its guide checked against the size limits
(nemodiff/runtime/decoding/guide_limits.py) but not compiled. The loop parks it here and a worker
thread compiles its grammar; the engine only ever receives the compiled grammar. xgrammar releases
the GIL while it compiles (a Python thread sleeping 1 ms per tick ticked 70 times during an 83 ms
compile), so the loop steps every other request meanwhile. While parked, a request is answered at once when its
client goes away or cancels it, when its deadline passes, or when its compile has run longer than the
compile time limit (a 400 naming the limit). A compile cannot be interrupted: an abandoned one runs on to
its end on its worker (its grammar then stays cached like any other); requests with the same guide share
one compile, and the size limits keep compiles short, so abandoned ones are rare. Workers are daemon
threads, ended by `close()` once their compile is done. A compile that returns while the interpreter finalizes aborts the process
(the thread unwinds through xgrammar's C++ frames: "terminate called without an active exception"),
so at exit the interpreter waits for running compiles, at most `EXIT_WAIT_S`; one still running after
that is cut off with the process, which is safe.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from nemodiff.runtime.request import Guide

from . import errors
from .updates import Handle, Update, error_update

log = logging.getLogger(__name__)
EXIT_WAIT_S = 5.0
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every GrammarWorkers with a thread still alive


@atexit.register
def _wait_at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    for workers in list(_LIVE):
        workers.wait_idle(max(0.0, deadline - time.monotonic()))


def client_gone(handle: Handle) -> bool:
    """The request was cancelled, or its client went away (a failing hook counts as gone)."""
    if handle.cancel_requested:
        return True
    try:
        return handle.is_cancelled is not None and bool(handle.is_cancelled())
    except Exception:  # noqa: BLE001
        return True


def default_workers() -> int:
    """Half the cores (at least one, at most four): the engine loop and the fronts keep the rest."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(eq=False)
class CompileJob:
    guide: Guide
    started: float | None = None  # time.monotonic() when a worker took it
    finished: bool = False
    grammar: object | None = None  # the compiled grammar
    error: str | None = None  # why it does not compile (a bad or too large guide)


@dataclass(eq=False)
class Parked:
    handle: Handle
    job: CompileJob
    command: tuple  # the submit command, admitted with the compiled grammar
    since: float = field(default_factory=time.monotonic)


class GrammarWorkers:
    """compile(guide) -> the compiled grammar (or ValueError); on_done() after every job (wakes the loop)."""

    def __init__(self, compile: Callable[[Guide], object], timeout_s: float, on_done: Callable[[], None],
                 workers: int | None = None):
        self.timeout_s = timeout_s
        self._compile = compile
        self._on_done = on_done
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[tuple, CompileJob] = {}  # in flight, by guide: one compile per distinct guide
        self._lock = threading.Lock()
        self._parked: list[Parked] = []  # loop thread only
        self.timed_out = 0  # parked requests that passed their deadline
        self._threads = [threading.Thread(target=self._work, name=f"nemodiff-grammar-{i}", daemon=True)
                         for i in range(workers or default_workers())]
        for thread in self._threads:
            thread.start()
        _LIVE.add(self)

    def close(self) -> None:
        """Let the workers end (each after its compile, if one runs); parked requests are the caller's."""
        while True:  # compiles not started: never
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # closed before
                continue
            key, job = item
            with self._lock:
                job.finished, job.error = True, "the server is shutting down"
                self._jobs.pop(key, None)
        for _ in self._threads:
            self._queue.put(None)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no compile is queued or running (at most `timeout` seconds); whether none is."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._jobs:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # -- loop thread ---------------------------------------------------------------------------
    def park(self, handle: Handle, guide: Guide, command: tuple) -> None:
        key = (guide.kind, guide.text, guide.choices)
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                job = self._jobs[key] = CompileJob(guide)
                self._queue.put((key, job))
        self._parked.append(Parked(handle, job, command))

    def __len__(self) -> int:
        return len(self._parked)

    def settle(self, finish: Callable[[Handle, Update], None], admit: Callable[[Parked], None]) -> None:
        """Answer (finish) or admit every parked request whose wait is over: cancelled or gone, past its
        deadline ("timeout", counted in `timed_out`), its guide does not compile or not within the time
        limit ("invalid"), or compiled."""
        waiting, now = [], time.monotonic()
        for parked in self._parked:
            handle, job = parked.handle, parked.job
            if client_gone(handle):
                finish(handle, Update(finished=True, finish_reason="cancelled"))
            elif handle.deadline is not None and now >= handle.deadline:
                self.timed_out += 1
                finish(handle, error_update(f"{errors.TIMED_OUT}: the request ran longer than its "
                                            f"{handle.timeout_s:g} s deadline while its grammar compiled", "timeout"))
            elif job.finished and job.error is not None:
                finish(handle, error_update(job.error, "invalid"))
            elif job.finished:
                admit(parked)
            elif job.started is not None and now - max(job.started, parked.since) > self.timeout_s:
                finish(handle, error_update(
                    f"the guide's grammar did not compile within the {self.timeout_s:g} s limit (grammar compile "
                    "time limit); send a smaller schema, fewer choices or a simpler grammar", "invalid"))
            else:
                waiting.append(parked)
        self._parked = waiting

    def take_all(self) -> list[Handle]:
        """Every parked request (they are answered by the caller)."""
        handles = [p.handle for p in self._parked]
        self._parked = []
        return handles

    # -- workers -------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, job = item
            job.started = time.monotonic()
            try:
                job.grammar = self._compile(job.guide)
            except ValueError as exc:
                job.error = str(exc)
            except MemoryError:
                job.error = "the guide's grammar is too large to compile (out of memory)"
            except Exception as exc:  # noqa: BLE001  (a worker must never die)
                log.exception("compiling a grammar failed")
                job.error = f"the guide's grammar could not be compiled: {type(exc).__name__}: {exc}"
            spent = time.monotonic() - job.started
            if spent > self.timeout_s:
                log.warning("a %s guide took %.1f s to compile (limit %g s)", job.guide.kind, spent, self.timeout_s)
            with self._lock:
                job.finished = True
                self._jobs.pop(key, None)
            try:
                self._on_done()
            except Exception:  # noqa: BLE001
                log.exception("waking the engine loop failed")
