"""The OpenAI frontend's way to the engine: Triton's gRPC streaming API.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: gRPC client]──▶ clients

Each OpenAI request is one gRPC stream carrying one request to the nemodiff model (so both
protocols share one engine, its batching, limits and metrics). An error response carries its
message only; the kind, and so the HTTP status, comes from the message (nemodiff/serving/errors.py). We
chose that over Triton's `triton_grpc_error` header, which would give real gRPC status codes but
makes Triton log "HandleCancellation called even when the context was not cancelled" at error
level for every failed request.

A stream whose request has ended is closed politely: our side half-closes and we wait for
Triton's OK. Cancelling it instead, as a client that drops it does, races with Triton writing
the last response, and Triton 2.51 then keeps the request's state for good, which keeps the
model "live" so that Triton cannot unload it at shutdown. Only a request still running is
cancelled (the HTTP client went away), which frees its KV pages at the next engine step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from nemodiff.serving import errors

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 503,
               "CANCELLED": 499, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501, "UNAUTHENTICATED": 401}
INPUT_TYPES = {"max_tokens": ("INT32", np.int32), "top_k": ("INT32", np.int32), "block_length": ("INT32", np.int32),
               "max_thinking_tokens": ("INT32", np.int32), "input_ids": ("INT32", np.int32),
               "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32), "threshold": ("FP32", np.float32),
               "frequency_penalty": ("FP32", np.float32), "presence_penalty": ("FP32", np.float32),
               "timeout": ("FP32", np.float32), "random_seed": ("UINT64", np.uint64), "stream": ("BOOL", np.bool_),
               "ignore_eos": ("BOOL", np.bool_), "exclude_input_in_output": ("BOOL", np.bool_),
               "return_log_probs": ("BOOL", np.bool_), "top_logprobs": ("INT32", np.int32),
               "num_return_sequences": ("INT32", np.int32), "min_tokens": ("INT32", np.int32),
               "repetition_penalty": ("FP32", np.float32)}
CLOSE_TIMEOUT_S = 5.0  # for Triton to close a finished stream after our half-close


class BackendError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    @classmethod
    def of(cls, message: str) -> "BackendError":
        """The error a model response carried, with the HTTP status of its kind."""
        return cls(errors.HTTP_STATUS[errors.kind_of(message)], message)


@dataclass
class Piece:
    """One response of the model: a text delta of choice `index` and its counts; `finish_reason` on the
    choice's last one, `final` on the request's last one. With log-probabilities: the response's token ids,
    one log-probability each, and per token its [(token id, log-probability)] alternatives."""

    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str | None
    final: bool
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    cached_tokens: int = 0


def triton_inputs(fields: dict) -> list:
    """Typed tensors for the model; raises ValueError (or TypeError, OverflowError) for a value of the wrong type."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in fields.items():
        if value is None:
            continue
        if name in INPUT_TYPES:
            datatype, dtype = INPUT_TYPES[name]
            array = np.array(value if isinstance(value, list) else [value], dtype=dtype).reshape(1, -1)
        else:
            values = value if isinstance(value, list) else [value]
            datatype = "BYTES"
            array = np.array([[v if isinstance(v, bytes) else v.encode("utf-8") for v in values]], dtype=np.object_)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _scalar(result, name: str, default=None):
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return default
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class TritonBackend:
    def __init__(self, grpc_url: str, model_name: str, api_key: str | None = None):
        self.grpc_url = grpc_url
        self.model_name = model_name
        # Triton's --grpc-restricted-protocol header (a fixed prefix before the key name; see nemodiff serve)
        self.headers = {"triton-grpc-protocol-authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = None

    def client(self):
        if self._client is None:  # created inside the serving event loop
            import tritonclient.grpc.aio as aioclient

            self._client = aioclient.InferenceServerClient(self.grpc_url)
        return self._client

    async def ready(self) -> bool:
        try:
            return bool(await self.client().is_model_ready(self.model_name))
        except Exception:
            return False

    async def generate(self, fields: dict) -> AsyncIterator[Piece]:
        """Responses of one request; raises BackendError with an HTTP status on an error response."""
        import grpc

        inputs = triton_inputs(fields)
        done = asyncio.Event()
        open_choices = int(fields.get("num_return_sequences") or 1)

        async def requests():
            yield {"model_name": self.model_name, "inputs": inputs}
            await done.wait()  # keep our side of the stream open until the last response

        call = self.client().stream_infer(requests(), headers=self.headers or None)
        finished = False
        try:
            while True:
                try:
                    result, error = await call.__anext__()
                except StopAsyncIteration:
                    raise BackendError(503, "the server closed the stream before the request finished") from None
                if error is not None:  # an error response is the request's last
                    finished = True
                    await _close(call, done)
                    raise BackendError.of(error.message())
                piece = _piece(result)
                open_choices -= piece.finish_reason is not None  # a choice's last response carries it
                piece.final = open_choices <= 0
                if piece.final:
                    finished = True
                    await _close(call, done)
                    yield piece
                    return
                yield piece
        except grpc.aio.AioRpcError as exc:
            finished = True  # the stream is over already
            message = exc.details() or exc.code().name
            status = HTTP_STATUS.get(exc.code().name, 500)
            raise BackendError(status, message) from None
        finally:
            done.set()
            if not finished:
                call.cancel()  # the HTTP client went away (or we failed): cancel the request in Triton


def _piece(result) -> Piece:
    ids = result.as_numpy("output_ids")
    piece = Piece(text=_scalar(result, "text_output", ""), num_input_tokens=int(_scalar(result, "num_input_tokens", 0)),
                  num_output_tokens=int(_scalar(result, "num_output_tokens", 0)),
                  finish_reason=_scalar(result, "finish_reason"), final=False,
                  index=int(_scalar(result, "sequence_index", 0)),
                  token_ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
                  cached_tokens=int(_scalar(result, "num_cached_tokens", 0)))
    values = result.as_numpy("output_log_probs")
    if values is not None:
        piece.logprobs = [float(v) for v in values.reshape(-1)]
        top_values, top_ids = result.as_numpy("output_top_log_probs"), result.as_numpy("output_top_token_ids")
        if top_values is not None and top_ids is not None:
            k = top_values.shape[-1]
            piece.top = [[(int(t), float(v)) for t, v in zip(row_ids, row_values) if t >= 0]
                         for row_ids, row_values in zip(top_ids.reshape(-1, k), top_values.reshape(-1, k))]
        else:
            piece.top = [[] for _ in piece.logprobs]
    return piece


async def _close(call, done: asyncio.Event) -> None:
    """Half-close a stream whose request has ended and wait for Triton to end it (see the module docstring)."""
    done.set()

    async def rest() -> None:
        try:
            while True:
                await call.__anext__()
        except StopAsyncIteration:
            pass

    try:
        await asyncio.wait_for(rest(), CLOSE_TIMEOUT_S)
    except Exception:  # it did not close in time, or failed: nothing is running on it any more
        call.cancel()
