"""Image preparation off Triton's execute thread, for the nemodiff model of a VLM engine.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the model's image workers]

Triton calls a model instance's `execute()` one batch at a time, so whatever `execute()` does
delays every request behind it. Decoding and resizing a large image takes seconds; done there,
a text request queued behind two requests of 16 big images each waited for all of them. So
`execute()` only parses a request, and a request with images is laid out (decoded, resized,
placeholders expanded) on a small pool of worker threads, then submitted to the engine.
The pool is bounded twice: a few workers (so the engine loop keeps a core), and at most
`max_pending` requests waiting for them; past that a request is refused at once, like a full
engine queue. Pillow and numpy release the GIL while they decode and resize.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def default_workers() -> int:
    """Half the cores (at least one, at most four): the engine loop and Triton keep the rest."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class ImageWorkers:
    def __init__(self, max_pending: int, workers: int | None = None):
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="nemodiff-images")
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> bool:
        """Run `job` on a worker; False (and nothing runs) when `max_pending` jobs are already waiting."""
        with self._lock:
            if self._pending >= self.max_pending:
                return False
            self._pending += 1

        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    self._pending -= 1

        try:
            self._pool.submit(run)
        except RuntimeError:  # shut down
            with self._lock:
                self._pending -= 1
            return False
        return True

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
