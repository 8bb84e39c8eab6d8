"""The nemodiff model's watcher thread: hang-ups, the control folder, the metrics.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the model's watcher]

Every few tens of milliseconds it
- asks Triton whether open requests were cancelled (a closed gRPC stream, or an HTTP
  connection Triton noticed was closed) and cancels those in the engine;
- takes the HTTP front's `cancel/KEY` entries (its client hung up) and cancels the request
  tagged KEY;
- on `drain` (or when `nemodiff serve` died without asking) retires the model: every open
  request is answered, new ones are refused, the engine stops; then it writes `drained`;
- refreshes the gauges and counters, including (in one instance) the requests the fronts
  refused themselves.
"""

from __future__ import annotations

import os
import threading
import time

import triton_python_backend_utils as pb_utils

from nemodiff.serving.control import DRAIN, DRAINED

WATCH_INTERVAL_S = 0.02
CANCEL_POLL_S = 0.05  # asking Triton whether a request was cancelled is a round trip per request
METRICS_INTERVAL_S = 0.2


class Watcher:
    def __init__(self, model):
        self.model = model
        self.control = model.control
        self.drained = False
        self.reports_fronts = self.control is not None and self.control.claim("front_metrics.owner")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemodiff-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        last_cancel_poll = last_metrics = 0.0
        while not self._stop.wait(WATCH_INTERVAL_S):
            now = time.monotonic()
            try:
                if now - last_cancel_poll >= CANCEL_POLL_S:
                    last_cancel_poll = now
                    self.poll_cancellations()
                if not self.drained and self._drain_requested():
                    self._drain()
                if now - last_metrics >= METRICS_INTERVAL_S:
                    last_metrics = now
                    self.refresh_metrics()
            except Exception as exc:
                pb_utils.Logger.log_warn(f"nemodiff: watcher: {exc}")

    def poll_cancellations(self) -> None:
        states = self.model.live_states()
        for state in states:
            if state.cancelled():  # never asks once the final response is claimed (see requests.py)
                for handle in state.handles:
                    self.model.engine.cancel(handle)
        if self.control is None:
            return
        keys = self.control.cancellations()
        if keys:
            by_key = {state.key: state for state in states if state.key is not None}
            for key in keys:
                state = by_key.get(key)
                if state is not None and state.handle is not None:  # else: not submitted yet, or another instance's
                    for handle in state.handles:
                        self.model.engine.cancel(handle)
                    self.control.forget(key)

    def refresh_metrics(self) -> None:
        self.model.metrics.refresh(self.model.engine.metrics())
        if self.reports_fronts:
            self.model.metrics.refresh_fronts(self.control.front_errors())

    def _drain_requested(self) -> bool:
        if self.control is not None and self.control.has(DRAIN):
            return True
        pid = self.model.supervisor_pid
        if pid:  # `nemodiff serve` died without draining us: drain on our own
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False

    def _drain(self) -> None:
        self.drained = True
        pb_utils.Logger.log_info("nemodiff: draining: answering every open request, refusing new ones, "
                                 "stopping the engine")
        self.model.retire()
        if self.control is not None:
            self.control.set(DRAINED)
