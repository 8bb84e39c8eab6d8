"""nemodiff's Triton model: a decoupled Python-backend model over the runtime's `AsyncEngine`.

checkpoint ──builder──▶ engine dir ──runtime──▶ [Triton: nemodiff/model_repo/nemodiff runs this]

`nemodiff/model_repo/nemodiff/1/model.py` finds the nemodiff installation and delegates to
`NemodiffModel`. `execute()` only parses and validates (a request with images is laid out on
the image workers, images.py); generation runs on the engine thread, which calls back with
`Update`s that become responses (text deltas when streaming, one response otherwise). Every
request gets exactly one final response: its output, or an error (INVALID_ARG for bad input,
UNAVAILABLE when the server is full, draining or past the request's deadline, INTERNAL when
generation failed), and every error is counted in `nemodiff_request_errors_total`.

With `--api-key`, every request must carry the key (any spelling of Bearer): the HTTP front's, or a gRPC
client's metadata, which Triton forwards as a request parameter instead of comparing it exactly itself.

The watcher (watch.py) cancels requests whose client went away, refreshes the metrics and
follows the control folder shared with `nemodiff serve` (nemodiff/serving/control.py): on `drain` the
model answers every open request, refuses new ones and stops its engine before SIGTERM
reaches Triton, so that nothing of it waits on Triton's unloading.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import threading
import time
from dataclasses import replace

import triton_python_backend_utils as pb_utils

from nemodiff.runtime.llm import LLM
from nemodiff.runtime.request import normalize_mode
from nemodiff.serving import errors
from nemodiff.serving.async_engine import AsyncEngine, Update
from nemodiff.serving.control import (
    API_KEY_ENV,
    FINALIZED,
    FRONT_AUTH,
    FRONT_KEY,
    GRPC_AUTH,
    Control,
    bearer_matches,
    valid_key,
)
from nemodiff.serving.triton.images import ImageWorkers
from nemodiff.serving.triton.inputs import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_TOKENS,
    BadRequest,
    PromptTokenizer,
    RequestInputs,
    parse_request,
)
from nemodiff.serving.triton.metrics import ModelMetrics
from nemodiff.serving.triton.requests import Choice, RequestState
from nemodiff.serving.triton.responses import response_arrays
from nemodiff.serving.triton.watch import Watcher

DRAIN_WAIT_S = 5.0
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
NO_KEY = (f"this server requires an API key: send the metadata '{GRPC_AUTH}: Bearer <key>' (or, over HTTP, the "
          "header 'Authorization: Bearer <key>')")
ERROR_CODES = {"invalid": pb_utils.TritonError.INVALID_ARG, "internal": pb_utils.TritonError.INTERNAL,
               "unavailable": pb_utils.TritonError.UNAVAILABLE, "timeout": pb_utils.TritonError.UNAVAILABLE}


def _tp_devices(groups: str, device_id) -> list[str] | None:
    """This instance's tensor-parallel GPUs: the group of `tp_gpu_groups` ("0,1;2,3") that starts at its GPU."""
    if not groups.strip() or device_id is None:
        return None
    for group in groups.split(";"):
        ids = [int(g) for g in group.split(",")]
        if ids[0] == int(device_id):
            return [f"cuda:{g}" for g in ids]
    raise ValueError(f"no tensor-parallel GPU group of {groups!r} starts at this instance's GPU {device_id}")


def _error(message: str, code) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _parameters(request) -> dict:
    try:
        value = json.loads(request.parameters() or "{}")
    except Exception:
        return {}
    return value if isinstance(value, dict) else {}


def _front_key(request) -> str | None:
    key = _parameters(request).get(FRONT_KEY)
    return key if valid_key(key) else None


class NemodiffModel:
    def __init__(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

        def number(key: str, cast=int):
            value = params.get(key, "").strip()
            return cast(value) or None if value else None

        device = params.get("device", "").strip() or None
        if device is None and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
        devices = _tp_devices(params.get("tp_gpu_groups", ""), args.get("model_instance_device_id"))
        self.instance = args.get("model_instance_name", "")
        self.default_mode = normalize_mode(params.get("default_mode", "").strip() or "ar")
        self.max_request_bytes = number("max_request_bytes") or 8 * 2**20
        self.max_n = number("max_n") or DEFAULT_MAX_N
        prefix_cache = params.get("prefix_cache", "").strip().lower() not in ("false", "0", "off", "no")
        control = params.get("control_dir", "").strip()
        self.control = Control(control) if control else None
        self.supervisor_pid = number("supervisor_pid")
        self.api_key = os.environ.get(API_KEY_ENV) or None  # set by `nemodiff serve --api-key` (or unset)
        self.llm = LLM(params["engine_dir"], device=device, kv_cache_memory_bytes=number("kv_cache_memory_bytes"),
                       max_batch_size=number("max_batch_size"),
                       max_num_batched_tokens=number("max_num_batched_tokens"), tp=number("tp"), devices=devices,
                       prefix_cache=prefix_cache)
        self.max_seq_len = self.llm.config.build.max_seq_len
        self.vocab_size = self.llm.config.model.vocab_size
        vocab = self.llm.tokenizer.vocab()  # read once, within its size limit, by the engine's tokenizer
        self.prompt_tokenizer = PromptTokenizer(self.llm.tokenizer.encode, vocab, self.max_seq_len)
        self._live: dict[int, RequestState] = {}
        self._live_lock = threading.Lock()
        self.metrics = ModelMetrics(self.instance)
        grammar_timeout = number("grammar_timeout_s", float)
        if grammar_timeout is not None:  # structured output: how long a grammar may take to compile
            self.llm.engine.guide_limits = replace(self.llm.engine.guide_limits, compile_timeout_s=grammar_timeout)
        max_queue = params.get("max_queue", "").strip()
        self.engine = AsyncEngine(self.llm, max_queue=int(max_queue) if max_queue else None,
                                  request_timeout_s=number("request_timeout_s", float), on_failure=self._on_failure)
        self.images = None
        if self.llm.engine.images is not None:
            self.images = ImageWorkers(max_pending=self.engine.capacity or 256)
        self.metrics.refresh(self.engine.metrics())
        # Responses leave from a thread of their own: sending is a round trip to the server process,
        # and the engine loop goes on with the next step meanwhile (one thread keeps each request's order).
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="nemodiff-send", daemon=True)
        self._sender.start()
        self.watcher = Watcher(self)
        self._finalized = False
        pb_utils.Logger.log_info(
            f"nemodiff: instance {self.instance}: engine {params['engine_dir']} on "
            f"{', '.join(map(str, devices)) if devices else self.llm.model.device} (tp {self.llm.tp}), "
            f"{self.llm.cache.num_pages} KV pages of {self.llm.cache.page_size} tokens, "
            f"max batch {self.llm.max_batch_size}, max queue {self.engine.max_queue}, "
            f"default mode {self.default_mode}")

    # -- requests ----------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if self.api_key is not None and not self._authorized(request):
                self._refuse(sender, NO_KEY, "invalid")
                continue
            try:
                self._start(request, sender)
            except BadRequest as exc:
                self._refuse(sender, str(exc), "invalid")
            except Exception as exc:  # unreadable input: still this request's problem, not the server's
                self._refuse(sender, f"could not read the request: {exc}", "invalid")
        return None

    def _authorized(self, request) -> bool:
        """The key of the HTTP front (which checked the client's) or of a gRPC client's metadata, which Triton
        forwards as a parameter and no longer compares itself: any spelling of Bearer, as on HTTP."""
        parameters = _parameters(request)
        return any(bearer_matches(parameters.get(name), self.api_key) for name in (FRONT_AUTH, GRPC_AUTH))

    def _start(self, request, sender) -> None:
        inputs = RequestInputs(lambda name: (lambda t: None if t is None else t.as_numpy())(
            pb_utils.get_input_tensor_by_name(request, name)))
        parsed = parse_request(inputs, self.prompt_tokenizer, self.llm.tokenizer.decode, self.default_mode,
                               self.vocab_size, self.max_request_bytes, self.max_n)
        state = RequestState(sender, parsed.stream, parsed.params.mode, 0, parsed.echo_prefix, _front_key(request),
                             n=parsed.n)
        state.logprobs = parsed.params.logprobs
        if parsed.images and self.images is not None:  # decoding takes seconds: not on this thread, which
            self._track(state)                            # every later request waits for
            if not self.images.submit(lambda: self._lay_out_and_submit(state, parsed)):
                self._untrack(state)
                self._refuse(sender, self.engine.closing or f"{errors.AT_CAPACITY} ({self.images.max_pending} "
                             "requests wait for their images to be decoded); retry later", "unavailable")
            return
        prompt_ids, prepared = self._checked_layout(parsed)
        self._track(state)
        try:
            self._submit(state, parsed, prompt_ids, prepared)
        except Exception:  # execute() sends the error: the state is no longer live
            state.claim_final()
            self._untrack(state)
            raise

    def _checked_layout(self, parsed):
        try:
            prompt_ids, prepared = self._lay_out_images(parsed)
            self.llm.engine.validate(prompt_ids, parsed.params)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return prompt_ids, prepared

    def _lay_out_and_submit(self, state: RequestState, parsed) -> None:
        """Image worker: decode and lay out the request's images, then hand it to the engine."""
        try:
            if state.client_gone():  # the client went away while the request waited for a worker
                self._send_final(state, None)
                return
            prompt_ids, prepared = self._checked_layout(parsed)
            self._submit(state, parsed, prompt_ids, prepared)
        except BadRequest as exc:
            self._fail(state, str(exc), "invalid")
        except Exception as exc:
            self._fail(state, errors.internal(f"while preparing the images: {exc}"), "internal")

    def _submit(self, state: RequestState, parsed, prompt_ids: list[int], prepared) -> None:
        """Each choice its own engine request (its seed derived from the request's); the later ones wait for
        the first one's prompt pages and reuse them."""
        state.num_input_tokens = len(prompt_ids)
        for choice in state.choices:
            if state.done:  # an earlier choice was refused: so is the request
                break
            leader = state.handle
            params = parsed.params.for_choice(choice.index) if parsed.n > 1 else parsed.params
            state.handles.append(self.engine.submit(
                parsed.prompt_ids, params, lambda update, s=state, c=choice: self._on_update(s, c, update),
                timeout_s=parsed.timeout_s, images=prepared, leader=leader))

    def _track(self, state: RequestState) -> None:
        with self._live_lock:
            self._live[id(state)] = state

    def _untrack(self, state: RequestState) -> None:
        with self._live_lock:
            self._live.pop(id(state), None)

    def live_states(self) -> list[RequestState]:
        with self._live_lock:
            return list(self._live.values())

    def _lay_out_images(self, parsed):
        """(expanded prompt ids, preprocessed images or None); a default max_tokens is refitted to what the
        images leave of the context. Raises ValueError for bad or unusable images."""
        engine, params = self.llm.engine, parsed.params
        if engine.images is None and not parsed.images:
            return parsed.prompt_ids, None
        if not parsed.max_tokens_given:
            params.max_new_tokens = 1  # the images may take what the default left
        prepared = engine.prepare_images(parsed.prompt_ids, parsed.images, params)
        if not parsed.max_tokens_given:
            room = self.max_seq_len - len(prepared.token_ids)
            if room < 1:
                raise ValueError(f"the prompt with its images is {len(prepared.token_ids)} tokens, which leaves no "
                                 f"room to generate (max_seq_len {self.max_seq_len}); send fewer or smaller images")
            params.max_new_tokens = min(DEFAULT_MAX_TOKENS, room)
        return prepared.token_ids, prepared

    def _on_update(self, state: RequestState, choice: Choice, update: Update) -> None:
        """Engine thread (or the submitting thread for a refusal): one update of one choice, zero or one
        responses. The request's final response is the last choice's last one, or the first error."""
        if update.token_ids and not state.first_token_seen:
            state.first_token_seen = True
            self.metrics.observe_ttft(state.mode, time.perf_counter() - state.arrived)
        if not update.finished:
            if state.stream:
                choice.pending_ids += update.token_ids
                choice.pending_logprobs += update.logprobs or []
                if update.text_delta and not state.done:
                    response = self._response(state, choice, update.text_delta, choice.pending_ids,
                                              choice.pending_logprobs)
                    choice.pending_ids, choice.pending_logprobs = [], []
                    self._send(state, response, final=False)
            return
        if update.error:
            response = _error(update.error, ERROR_CODES.get(update.error_kind, pb_utils.TritonError.INTERNAL))
            for handle in state.handles:  # the request fails as a whole: its other choices stop
                self.engine.cancel(handle)
        elif update.finish_reason == "cancelled":
            response = None
        elif state.stream:
            response = self._response(state, choice, update.text_delta, choice.pending_ids + update.token_ids,
                                      choice.pending_logprobs + (update.logprobs or []), update.output)
        else:
            response = self._response(state, choice, update.output.text, update.output.output_ids,
                                      update.output.logprobs, update.output)
        if response is not None and not update.error and not state.finish_choice(choice):
            if not state.done:
                self._send(state, response, final=False)
        else:
            self._send_final(state, response)
        self.metrics.observe_final(state.mode, update)  # after the response: a metrics failure cannot lose it

    def _response(self, state: RequestState, choice: Choice, text: str, ids: list[int], logprobs: list | None,
                  output=None) -> pb_utils.InferenceResponse:
        arrays = response_arrays(choice, text, ids, state.num_input_tokens, logprobs, state.logprobs,
                                 len(state.choices), output)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array) for name, array in arrays])

    # -- sending -----------------------------------------------------------------------------
    def _send(self, state: RequestState, response, final: bool) -> None:
        self._outbox.put((state, response, final))

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            if isinstance(item, threading.Event):  # a flush marker: everything before it is sent
                item.set()
                continue
            self._send_now(*item)

    def flush_outbox(self, timeout: float) -> None:
        marker = threading.Event()
        self._outbox.put(marker)
        marker.wait(timeout)

    def _send_now(self, state: RequestState, response, final: bool) -> None:
        try:
            if response is None:
                state.sender.send(flags=FINAL)
            else:
                state.sender.send(response, flags=FINAL if final else 0)
        except Exception as exc:  # the client went away; nothing else to do for it
            pb_utils.Logger.log_warn(f"nemodiff: could not send a response: {exc}")

    def _send_final(self, state: RequestState, response) -> None:
        if not state.claim_final():
            return
        self._untrack(state)
        self._send(state, response, final=True)

    def _fail(self, state: RequestState, message: str, kind: str) -> None:
        """A tracked request that never reached the engine ends with an error."""
        self._send_final(state, _error(message, ERROR_CODES[kind]))
        self.metrics.count_error(kind)

    def _refuse(self, sender, message: str, kind: str) -> None:
        """A request refused in execute() (never tracked): its one response is this error."""
        try:
            sender.send(_error(message, ERROR_CODES[kind]), flags=FINAL)
        except Exception as exc:
            pb_utils.Logger.log_warn(f"nemodiff: could not send an error response: {exc}")
        self.metrics.count_error(kind)

    # -- supervision -------------------------------------------------------------------------
    def _on_failure(self, message: str) -> None:
        """Engine thread, after every pending request got its error: report, so the supervisor restarts us."""
        pb_utils.Logger.log_error(f"nemodiff: the engine loop failed; the model is no longer serving: {message}")
        self.metrics.set_healthy(False)
        if self.control is not None:
            self.control.set("failed", message)

    def retire(self) -> None:
        """Answer every open request, refuse new ones and stop the engine (and its tensor-parallel workers).
        What stays is what answers refusals: the sender and the watcher. Safe to call more than once."""
        self.engine.drain(errors.SHUTTING_DOWN).wait(DRAIN_WAIT_S)
        self.engine.shutdown()
        if self.images is not None:
            self.images.close(wait=False)
        for state in self.live_states():  # waited for an image worker, or the engine could not be stopped
            self._send_final(state, _error(errors.SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE))
        self.flush_outbox(DRAIN_WAIT_S)  # every answer has left
        self.llm.close()
        self.metrics.refresh(self.engine.metrics())

    def finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        self.watcher.stop()
        self.retire()
        self._outbox.put(None)  # everything queued before this is sent first
        self._sender.join(timeout=DRAIN_WAIT_S)
        # The model sits in reference cycles (its threads and callbacks hold it), so only a garbage collection
        # frees it: its metric families go now, and the cycles are collected while the stub is whole.
        self.metrics.close()
        gc.collect()
        if self.control is not None:
            self.control.set(FINALIZED)
