"""nemodiff's Triton model: a decoupled Python-backend model over the runtime's `AsyncEngine`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: model_repo/nemodiff]

Keeps the public contract of TensorRT-LLM's `tensorrt_llm_bls` model (`text_input`,
`max_tokens`, `stream`, sampling inputs, `text_output`), so Triton's generate endpoints,
its OpenAI-compatible frontend and genai-perf work unchanged; nemodiff adds `decode_mode`,
`block_length`, `threshold`, `max_thinking_tokens` and `input_ids`, and returns
`output_ids`, `num_forward_passes` and `num_output_tokens`.

`execute()` only parses and validates; generation runs on the engine thread, which calls
back with `Update`s that become responses (text deltas when streaming, one response
otherwise). A bad request gets an INVALID_ARG error response; the server keeps serving.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from nemodiff import LLM, SamplingParams
from nemodiff.runtime.request import MODES, normalize_mode
from nemodiff.runtime.server import AsyncEngine

DEFAULT_MAX_TOKENS = 64  # when a request has no max_tokens (capped by what the context has room for)
DEFAULT_THRESHOLD = 0.9
METRICS_INTERVAL_S = 0.2
CANCEL_POLL_S = 0.05  # asking Triton whether a request was cancelled is a round trip: not every step
SPEC_MODES = ("linear-spec", "quadratic-spec")
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ACCEPTED_BUCKETS = [0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64]
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
GAUGES = ("kv_cache_pages_used", "kv_cache_pages_total", "requests_running", "requests_waiting")
GAUGE_HELP = {"kv_cache_pages_used": "KV-cache pages in use", "kv_cache_pages_total": "KV-cache pages in the pool",
              "requests_running": "requests scheduled in the engine", "requests_waiting": "requests queued or preempted"}


def _tp_devices(groups: str, device_id, device: str | None) -> list[str] | None:
    """This instance's tensor-parallel GPUs: the group of `tp_gpu_groups` ("0,1;2,3") that starts at its GPU."""
    if not groups.strip() or device_id is None:
        return None
    for group in groups.split(";"):
        ids = [int(g) for g in group.split(",")]
        if ids[0] == int(device_id):
            return [f"cuda:{g}" for g in ids]
    raise ValueError(f"no tensor-parallel GPU group of {groups!r} starts at this instance's GPU {device_id}")


class BadRequest(ValueError):
    """The request cannot run as given; answered with INVALID_ARG."""


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("string inputs must be UTF-8") from None
    return str(value)


def _float(value) -> float:
    # FP32 inputs: take the shortest decimal that round-trips (0.9, not 0.8999999761581421)
    return float(np.format_float_positional(np.float32(value), unique=True))


class _Inputs:
    def __init__(self, request):
        self.request = request

    def array(self, name: str) -> np.ndarray | None:
        tensor = pb_utils.get_input_tensor_by_name(self.request, name)
        return None if tensor is None else tensor.as_numpy()

    def scalar(self, name: str, cast):
        array = self.array(name)
        if array is None or array.size == 0:
            return None
        if array.size != 1:
            raise BadRequest(f"{name} takes one value per request (got {array.size})")
        return cast(array.reshape(-1)[0])

    def strings(self, name: str) -> list[str]:
        array = self.array(name)
        return [] if array is None else [_text(v) for v in array.reshape(-1)]


class _RequestState:
    """One request in flight: where its responses go and what is still to be sent."""

    def __init__(self, sender, stream: bool, mode: str):
        self.sender = sender
        self.stream = stream
        self.mode = mode
        self.arrived = time.perf_counter()
        self.first_token_seen = False
        self.pending_ids: list[int] = []  # streamed ids whose text is still held back
        self.done = False
        self._cancelled = False
        self._checked = 0.0

    def is_cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._checked >= CANCEL_POLL_S:
            self._checked = now
            try:
                self._cancelled = bool(self.sender.is_cancelled())
            except Exception:  # the request is gone on Triton's side
                self._cancelled = True
        return self._cancelled


def _response(text: str, ids: list[int], output=None) -> pb_utils.InferenceResponse:
    tensors = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
               pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, -1))]
    if output is not None:
        tensors += [pb_utils.Tensor("num_forward_passes", np.array([[output.num_forward_passes]], dtype=np.int32)),
                    pb_utils.Tensor("num_output_tokens", np.array([[len(output.output_ids)]], dtype=np.int32))]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message: str, code) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        def number(key: str) -> int | None:
            value = params.get(key, "").strip()
            return int(value) or None if value else None

        device = params.get("device", "").strip() or None
        if device is None and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        devices = _tp_devices(params.get("tp_gpu_groups", ""), args.get("model_instance_device_id"), device)
        self.instance = args.get("model_instance_name", "")
        self.default_mode = normalize_mode(params.get("default_mode", "").strip() or "ar")
        self.llm = LLM(params["engine_dir"], device=device, kv_cache_memory_bytes=number("kv_cache_memory_bytes"),
                       max_batch_size=number("max_batch_size"),
                       max_num_batched_tokens=number("max_num_batched_tokens"), tp=number("tp"), devices=devices)
        self.max_seq_len = self.llm.config.build.max_seq_len
        self.vocab_size = self.llm.config.model.vocab_size
        self._live: dict[int, _RequestState] = {}
        self._live_lock = threading.Lock()
        self._init_metrics()
        self.engine = AsyncEngine(self.llm)
        self._refresh_metrics()
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._metrics_loop, name="nemodiff-metrics", daemon=True)
        self._metrics_thread.start()
        pb_utils.Logger.log_info(
            f"nemodiff: instance {self.instance}: engine {params['engine_dir']} on "
            f"{', '.join(map(str, devices)) if devices else self.llm.model.device} (tp {self.llm.tp}), "
            f"{self.llm.cache.num_pages} KV pages of {self.llm.cache.page_size} tokens, "
            f"max batch {self.llm.max_batch_size}, default mode {self.default_mode}")

    # -- metrics -----------------------------------------------------------------------------
    def _labels(self, **labels: str) -> dict[str, str]:
        """Every series names its model instance: replicas (instance groups) report side by side."""
        return {"instance": self.instance, **labels}

    def _init_metrics(self) -> None:
        gauge, counter, histogram = (pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER,
                                     pb_utils.MetricFamily.HISTOGRAM)
        self._families = {}  # families must stay referenced or Triton drops them
        self._gauges = {}
        for key in GAUGES:
            family = pb_utils.MetricFamily(name=f"nemodiff_{key}", description=GAUGE_HELP[key], kind=gauge)
            self._families[key] = family
            self._gauges[key] = family.Metric(labels=self._labels())
        self._counters = {}
        for key, text in (("output_tokens", "generated tokens"), ("forward_passes", "request-forwards")):
            family = pb_utils.MetricFamily(name=f"nemodiff_{key}_total", description=f"{text}, by mode", kind=counter)
            self._families[key] = family
            self._counters[key] = {mode: family.Metric(labels=self._labels(mode=mode)) for mode in MODES}
        family = pb_utils.MetricFamily(name="nemodiff_preemptions_total", kind=counter,
                                       description="preemptions (the KV pool ran dry), counted when the request finishes")
        self._families["preemptions"] = family
        self._preemptions = family.Metric(labels=self._labels())
        family = pb_utils.MetricFamily(name="nemodiff_time_to_first_token_seconds", kind=histogram,
                                       description="from request arrival to its first generated token, by mode")
        self._families["ttft"] = family
        self._ttft = {mode: family.Metric(labels=self._labels(mode=mode), buckets=TTFT_BUCKETS) for mode in MODES}
        family = pb_utils.MetricFamily(name="nemodiff_accepted_length", kind=histogram,
                                       description="tokens accepted per speculation cycle, by mode")
        self._families["accepted"] = family
        self._accepted = {mode: family.Metric(labels=self._labels(mode=mode), buckets=ACCEPTED_BUCKETS)
                          for mode in SPEC_MODES}
        self._last_gauges: dict[str, int] = {}
        self._last_counts: dict[tuple[str, str], int] = {}
        self._metrics_lock = threading.Lock()

    def _refresh_metrics(self) -> None:
        snapshot = self.engine.metrics()
        with self._metrics_lock:
            for key, metric in self._gauges.items():
                if self._last_gauges.get(key) != snapshot[key]:
                    metric.set(snapshot[key])
                    self._last_gauges[key] = snapshot[key]
            for key, by_mode in self._counters.items():
                for mode, count in snapshot[key].items():
                    previous = self._last_counts.get((key, mode), 0)
                    if count > previous and mode in by_mode:
                        by_mode[mode].increment(count - previous)
                        self._last_counts[key, mode] = count

    def _metrics_loop(self) -> None:
        while not self._stop.wait(METRICS_INTERVAL_S):
            try:
                self._refresh_metrics()
            except Exception as exc:
                pb_utils.Logger.log_warn(f"nemodiff: metrics refresh failed: {exc}")

    def _observe_final(self, state: _RequestState, output) -> None:
        stats = output.stats or {}
        histogram = stats.get("accepted_length_histogram") or {}
        with self._metrics_lock:
            if state.mode in self._accepted:
                for length, count in histogram.items():
                    for _ in range(int(count)):
                        self._accepted[state.mode].observe(float(length))
            if stats.get("preemptions"):
                self._preemptions.increment(int(stats["preemptions"]))

    # -- requests ----------------------------------------------------------------------------
    def _parse(self, request) -> tuple[list[int], SamplingParams, bool]:
        inputs = _Inputs(request)
        ids = inputs.array("input_ids")
        if ids is not None and ids.size:
            prompt_ids = [int(i) for i in ids.reshape(-1)]
        else:
            texts = inputs.strings("text_input")
            if len(texts) != 1:
                raise BadRequest(f"text_input takes one prompt per request (got {len(texts)})")
            prompt_ids = self.llm.tokenizer.encode(texts[0])
        if len(prompt_ids) >= self.max_seq_len:
            raise BadRequest(f"the prompt has {len(prompt_ids)} tokens; the engine's max_seq_len is "
                             f"{self.max_seq_len} (prompt + max_tokens must fit)")
        max_tokens = inputs.scalar("max_tokens", int)
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.max_seq_len - len(prompt_ids))
        elif max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1 (got {max_tokens})")
        if any(inputs.strings("bad_words")):
            raise BadRequest("bad_words is not supported by nemodiff; leave it empty")
        for name in ("frequency_penalty", "presence_penalty"):
            value = inputs.scalar(name, _float)
            if value:
                raise BadRequest(f"{name} is not supported by nemodiff (got {value}); leave it 0 or unset")
        stop_token_ids = []
        end_id = inputs.scalar("end_id", int)
        if end_id is not None:
            if not 0 <= end_id < self.vocab_size:
                raise BadRequest(f"end_id {end_id} is outside the vocabulary [0, {self.vocab_size})")
            stop_token_ids.append(end_id)
        modes = inputs.strings("decode_mode")
        try:
            mode = normalize_mode(modes[0]) if modes and modes[0].strip() else self.default_mode
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        threshold = inputs.scalar("threshold", _float)
        if threshold is None:
            threshold = DEFAULT_THRESHOLD
        elif not 0 < threshold <= 1:
            raise BadRequest(f"threshold must be in (0, 1] (got {threshold})")
        seed = inputs.scalar("random_seed", int)
        if seed is None:
            seed = inputs.scalar("seed", int)
        temperature, top_p, top_k = (inputs.scalar("temperature", _float), inputs.scalar("top_p", _float),
                                     inputs.scalar("top_k", int))
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=0.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p, top_k=0 if top_k is None else top_k, seed=seed,
            stop=[s for s in inputs.strings("stop_words") if s], stop_token_ids=stop_token_ids, mode=mode,
            block_length=inputs.scalar("block_length", int), threshold=threshold,
            max_thinking_tokens=inputs.scalar("max_thinking_tokens", int),
        )
        try:
            self.llm.engine.validate(prompt_ids, params)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        stream = inputs.scalar("stream", bool)
        return prompt_ids, params, bool(stream)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt_ids, params, stream = self._parse(request)
            except BadRequest as exc:
                self._send(sender, _error(str(exc), pb_utils.TritonError.INVALID_ARG))
                continue
            except Exception as exc:  # unreadable input: still this request's problem, not the server's
                self._send(sender, _error(f"could not read the request: {exc}", pb_utils.TritonError.INVALID_ARG))
                continue
            state = _RequestState(sender, stream, params.mode)
            with self._live_lock:
                self._live[id(state)] = state
            self.engine.submit(prompt_ids, params, lambda update, s=state: self._on_update(s, update),
                               is_cancelled=state.is_cancelled)
        return None

    def _on_update(self, state: _RequestState, update) -> None:
        """Engine thread: turn one update into zero or one responses."""
        if update.token_ids and not state.first_token_seen:
            state.first_token_seen = True
            with self._metrics_lock:
                self._ttft[state.mode].observe(time.perf_counter() - state.arrived)
        self._refresh_metrics()
        if not update.finished:
            if state.stream:
                state.pending_ids += update.token_ids
                if update.text_delta:
                    self._send(state.sender, _response(update.text_delta, state.pending_ids), final=False)
                    state.pending_ids = []
            return
        self._forget(state)
        if update.error:
            code = pb_utils.TritonError.INTERNAL if update.error_kind == "internal" else pb_utils.TritonError.INVALID_ARG
            self._send(state.sender, _error(update.error, code))
        elif update.finish_reason == "cancelled":
            self._send(state.sender, None)
        elif state.stream:
            self._send(state.sender, _response(update.text_delta, state.pending_ids + update.token_ids, update.output))
        else:
            self._send(state.sender, _response(update.output.text, update.output.output_ids, update.output))
        if update.output is not None:
            self._observe_final(state, update.output)

    def _forget(self, state: _RequestState) -> None:
        state.done = True
        with self._live_lock:
            self._live.pop(id(state), None)

    @staticmethod
    def _send(sender, response, final: bool = True) -> None:
        try:
            if response is None:
                sender.send(flags=FINAL)
            else:
                sender.send(response, flags=FINAL if final else 0)
        except Exception as exc:  # the client went away; nothing else to do for it
            pb_utils.Logger.log_warn(f"nemodiff: could not send a response: {exc}")

    def finalize(self):
        self._stop.set()
        self.engine.shutdown()
        self.llm.close()
        self._metrics_thread.join(timeout=2.0)
        with self._live_lock:
            left, self._live = list(self._live.values()), {}
        for state in left:
            self._send(state.sender, _error("the server is shutting down", pb_utils.TritonError.UNAVAILABLE))
