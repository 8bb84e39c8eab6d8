"""The `nemodiff_*` series of a Dynamo worker, on its own port (`nemodiff worker --metrics-port`).

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: the worker's metrics] ──▶ Prometheus

The same table as the Triton model's metrics (nemodiff/serving/metric_names.py): gauges and counters
are read from an `AsyncEngine.metrics()` snapshot at each scrape; errors, preemptions, time to first
token and accepted lengths are observed per request. Nothing here raises into a request: a metrics
failure must not cost a response.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nemodiff.serving import metric_names as names
from nemodiff.serving.errors import KINDS

log = logging.getLogger(__name__)


def _base(name: str) -> str:
    return name[: -len("_total")] if name.endswith("_total") else name


class _Snapshot:
    """Gauges and counters from the engine's snapshot, at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        snapshot = self.engine.metrics()
        for key, text in names.GAUGES.items():
            yield GaugeMetricFamily(f"nemodiff_{key}", text, value=snapshot.get(key, 0))
        for key, (name, text) in names.COUNTERS.items():
            yield CounterMetricFamily(_base(name), text, value=snapshot.get(key, 0))
        for key, (text, modes) in names.BY_MODE.items():
            family = CounterMetricFamily(f"nemodiff_{key}", text, labels=["mode"])
            for mode in modes:
                family.add_metric([mode], snapshot.get(key, {}).get(mode, 0))
            yield family


class WorkerMetrics:
    """The registry of one worker; `serve(port)` starts its HTTP endpoint (/metrics)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_Snapshot(engine))
        self.errors = Counter(_base(names.ERRORS[0]), names.ERRORS[1], ["kind"], registry=self.registry)
        for kind in KINDS:
            self.errors.labels(kind=kind)
        self.preemptions = Counter(_base(names.PREEMPTIONS[0]), names.PREEMPTIONS[1], registry=self.registry)
        self.ttft = Histogram(names.TTFT[0], names.TTFT[1], ["mode"], buckets=names.TTFT_BUCKETS, registry=self.registry)
        self.accepted = Histogram(names.ACCEPTED[0], names.ACCEPTED[1], ["mode"], buckets=names.ACCEPTED_BUCKETS, registry=self.registry)
        self._server = None

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe_ttft(self, mode: str, seconds: float) -> None:
        try:
            self.ttft.labels(mode=mode).observe(seconds)
        except Exception:
            log.exception("metrics (ttft) failed")

    def observe_final(self, mode: str, update) -> None:
        try:
            if update.error_kind in KINDS:
                self.errors.labels(kind=update.error_kind).inc()
            stats = (update.output.stats if update.output is not None else None) or {}
            if mode in names.SPEC_MODES:
                for length, count in (stats.get("accepted_length_histogram") or {}).items():
                    for _ in range(int(count)):
                        self.accepted.labels(mode=mode).observe(float(length))
            if stats.get("preemptions"):
                self.preemptions.inc(int(stats["preemptions"]))
        except Exception:
            log.exception("metrics (final) failed")
