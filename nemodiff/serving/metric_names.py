"""The `nemodiff_*` Prometheus series every serving front exports: names, help texts and buckets.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: the metric table] ──▶ Prometheus

One table, two exporters: the Triton model (`triton/metrics.py`, on Triton's metrics port) and the
Dynamo worker (`dynamo/metrics.py`, on `nemodiff worker --metrics-port`). Both refresh gauges and
counters from `AsyncEngine.metrics()` snapshots and observe the histograms per request, so a
dashboard or an autoscaler rule reads the same series whichever front serves the engine.
"""

from __future__ import annotations

from nemodiff.runtime.request import AUTO_MODES, MODES

SPEC_MODES = ("linear-spec", "quadratic-spec")
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ACCEPTED_BUCKETS = [0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64]
GAUGES = {  # snapshot key -> help; the series is nemodiff_<key>
    "kv_cache_pages_used": "KV-cache pages in use",
    "kv_cache_pages_total": "KV-cache pages in the pool",
    "requests_running": "requests scheduled in the engine",
    "requests_waiting": "requests queued or preempted in the engine",
    "requests_in_flight": "requests accepted and not yet answered",
    "engine_healthy": "1 while the engine loop runs, 0 once it has failed",
}
COUNTERS = {  # snapshot key -> (metric name, help)
    "requests_refused": ("nemodiff_requests_refused_total",
                         "requests refused at once: queue full, draining or engine failed"),
    "requests_timed_out": ("nemodiff_requests_timed_out_total", "requests ended by their deadline"),
    "vision_cache_hits": ("nemodiff_vision_cache_hits_total",
                          "images whose vision-tower output was reused from the content-hash cache"),
    "vision_cache_misses": ("nemodiff_vision_cache_misses_total", "images run through the vision tower"),
    "prefix_cache_queries": ("nemodiff_prefix_cache_queries_total",
                             "prompt tokens looked up in the prefix cache (new requests)"),
    "prefix_cache_hits": ("nemodiff_prefix_cache_hits_total",
                          "prompt tokens whose KV the prefix cache supplied"),
}
BY_MODE = {  # snapshot key (a dict by mode) -> (help, the modes labelled); the series is nemodiff_<key>_total{mode}
    "output_tokens": ("generated tokens, by the mode that ran", MODES),
    "forward_passes": ("request-forwards, by the mode that ran", MODES),
    "auto_mode_steps": ('request-forwards of mode="auto" requests, by the mode that ran', AUTO_MODES),
}
ERRORS = ("nemodiff_request_errors_total", "requests that ended with an error, by kind")
PREEMPTIONS = ("nemodiff_preemptions_total",
               "preemptions (the KV pool ran dry), counted when the request finishes")
TTFT = ("nemodiff_time_to_first_token_seconds", "from request arrival to its first generated token, by mode")
ACCEPTED = ("nemodiff_accepted_length", "tokens accepted per speculation cycle, by mode")
