"""Prometheus metrics of the nemodiff Triton model (served on Triton's metrics port).

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: the nemodiff model's metrics]

Gauges and counters are refreshed from `AsyncEngine.metrics()` snapshots; histograms are
observed per request. Every method is safe to call from any thread and never raises:
a metrics failure must not cost a response.
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from nemodiff.runtime.request import MODES
from nemodiff.serving import metric_names as names
from nemodiff.serving.errors import KINDS


class ModelMetrics:
    """Every series carries an `instance` label: replicas (instance groups) report side by side."""

    def __init__(self, instance: str = ""):
        self.instance = instance
        gauge, counter, histogram = (pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER,
                                     pb_utils.MetricFamily.HISTOGRAM)
        self._families = {}  # families must stay referenced or Triton drops them
        self._gauges = {}
        for key, text in names.GAUGES.items():
            family = pb_utils.MetricFamily(name=f"nemodiff_{key}", description=text, kind=gauge)
            self._families[key] = family
            self._gauges[key] = family.Metric(labels=self._labels())
        self._counters = {}
        for key, (name, text) in names.COUNTERS.items():
            family = pb_utils.MetricFamily(name=name, description=text, kind=counter)
            self._families[key] = family
            self._counters[key] = family.Metric(labels=self._labels())
        self._by_mode = {}
        for key, (text, modes) in names.BY_MODE.items():
            family = pb_utils.MetricFamily(name=f"nemodiff_{key}_total", description=text, kind=counter)
            self._families[key] = family
            self._by_mode[key] = {mode: family.Metric(labels=self._labels(mode=mode)) for mode in modes}
        family = pb_utils.MetricFamily(name=names.ERRORS[0], kind=counter, description=names.ERRORS[1])
        self._families["errors"] = family
        self._errors = {kind: family.Metric(labels=self._labels(kind=kind)) for kind in KINDS}
        family = pb_utils.MetricFamily(name=names.PREEMPTIONS[0], kind=counter, description=names.PREEMPTIONS[1])
        self._families["preemptions"] = family
        self._preemptions = family.Metric(labels=self._labels())
        family = pb_utils.MetricFamily(name=names.TTFT[0], kind=histogram, description=names.TTFT[1])
        self._families["ttft"] = family
        self._ttft = {mode: family.Metric(labels=self._labels(mode=mode), buckets=names.TTFT_BUCKETS) for mode in MODES}
        family = pb_utils.MetricFamily(name=names.ACCEPTED[0], kind=histogram, description=names.ACCEPTED[1])
        self._families["accepted"] = family
        self._accepted = {mode: family.Metric(labels=self._labels(mode=mode), buckets=names.ACCEPTED_BUCKETS) for mode in names.SPEC_MODES}
        self._front: dict = {}  # ("front", kind) -> metric, made when a front first refuses one
        self._last: dict = {}
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Drop every family and metric now, while the backend stub can still hear of it. A family that
        outlives the model is destroyed by the interpreter's last garbage collection, after the stub has
        let go of its shared memory, and its destructor's message to the server then segfaults.
        Later calls do nothing."""
        with self._lock:
            self._closed = True
            for name in ("_families", "_gauges", "_counters", "_by_mode", "_errors", "_ttft", "_accepted", "_front"):
                setattr(self, name, {})
            self._preemptions = None

    def _safely(self, what: str, action) -> None:
        try:
            with self._lock:
                if self._closed:
                    return
                action()
        except Exception as exc:
            pb_utils.Logger.log_warn(f"nemodiff: metrics ({what}) failed: {exc}")

    def refresh(self, snapshot: dict) -> None:
        def apply():
            for key, metric in self._gauges.items():
                if key in snapshot and self._last.get(key) != snapshot[key]:
                    metric.set(snapshot[key])
                    self._last[key] = snapshot[key]
            for key, metric in self._counters.items():
                previous = self._last.get(key, 0)
                if snapshot.get(key, 0) > previous:
                    metric.increment(snapshot[key] - previous)
                    self._last[key] = snapshot[key]
            for key, by_mode in self._by_mode.items():
                for mode, count in snapshot.get(key, {}).items():
                    previous = self._last.get((key, mode), 0)
                    if count > previous and mode in by_mode:
                        by_mode[mode].increment(count - previous)
                        self._last[key, mode] = count

        self._safely("refresh", apply)

    def set_healthy(self, healthy: bool) -> None:
        def apply():
            self._gauges["engine_healthy"].set(int(healthy))
            self._last["engine_healthy"] = int(healthy)

        self._safely("health", apply)

    def observe_ttft(self, mode: str, seconds: float) -> None:
        self._safely("ttft", lambda: self._ttft[mode].observe(seconds))

    def count_error(self, kind: str) -> None:
        """A request answered with an error before it reached the engine (refused in execute())."""
        self._safely("error", lambda: self._errors[kind].increment(1))

    def refresh_fronts(self, counts: dict[str, int]) -> None:
        """Requests the fronts of `nemodiff serve` refused before they reached Triton (bad bodies, wrong API
        keys), as totals; reported by one instance under the instance label "front"."""
        def apply():
            for kind, total in counts.items():
                previous = self._last.get(("front", kind), 0)
                if total > previous:
                    if ("front", kind) not in self._front:
                        self._front["front", kind] = self._families["errors"].Metric(
                            labels={"instance": "front", "kind": kind})
                    self._front["front", kind].increment(total - previous)
                    self._last["front", kind] = total

        self._safely("fronts", apply)

    def observe_final(self, mode: str, update) -> None:
        def apply():
            if update.error_kind in self._errors:
                self._errors[update.error_kind].increment(1)
            stats = (update.output.stats if update.output is not None else None) or {}
            if mode in self._accepted:
                for length, count in (stats.get("accepted_length_histogram") or {}).items():
                    for _ in range(int(count)):
                        self._accepted[mode].observe(float(length))
            if stats.get("preemptions"):
                self._preemptions.increment(int(stats["preemptions"]))

        self._safely("final", apply)

    def _labels(self, **labels: str) -> dict[str, str]:
        return {"instance": self.instance, **labels}
