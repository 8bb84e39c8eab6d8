"""The OpenAI frontend's way to the engine: Triton's gRPC streaming API.

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend: gRPC client]──▶ clients

Each OpenAI request is one gRPC stream carrying one request to the nemodiff model (so both
protocols share one engine, its batching, limits and metrics). Streams are opened with
Triton's `triton_grpc_error` header: an error response then closes the stream with a real
gRPC status code (INVALID_ARGUMENT, UNAVAILABLE, INTERNAL, ...), which becomes the HTTP
status. Cancelling the stream (a client that went away) cancels the request in Triton,
which frees its KV pages at the next engine step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 503,
               "CANCELLED": 499, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501}
INPUT_TYPES = {"max_tokens": ("INT32", np.int32), "top_k": ("INT32", np.int32), "block_length": ("INT32", np.int32),
               "max_thinking_tokens": ("INT32", np.int32), "input_ids": ("INT32", np.int32),
               "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32), "threshold": ("FP32", np.float32),
               "frequency_penalty": ("FP32", np.float32), "presence_penalty": ("FP32", np.float32),
               "timeout": ("FP32", np.float32), "random_seed": ("UINT64", np.uint64), "stream": ("BOOL", np.bool_),
               "ignore_eos": ("BOOL", np.bool_), "exclude_input_in_output": ("BOOL", np.bool_)}


class BackendError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Piece:
    """One response of the model: a text delta and its counts; `finish_reason` on the last one."""

    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str | None
    final: bool


def triton_inputs(fields: dict) -> list:
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
    def __init__(self, grpc_url: str, model_name: str):
        self.grpc_url = grpc_url
        self.model_name = model_name
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

        done = asyncio.Event()

        async def requests():
            yield {"model_name": self.model_name, "inputs": triton_inputs(fields)}
            await done.wait()  # keep our side of the stream open until the last response

        call = self.client().stream_infer(requests(), headers={"triton_grpc_error": "true"})
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    raise BackendError(500, error.message())
                reason = _scalar(result, "finish_reason")  # only the final response carries it
                final = reason is not None
                yield Piece(text=_scalar(result, "text_output", ""),
                            num_input_tokens=int(_scalar(result, "num_input_tokens", 0)),
                            num_output_tokens=int(_scalar(result, "num_output_tokens", 0)),
                            finish_reason=reason, final=final)
                if final:
                    finished = True
                    return
            raise BackendError(503, "the server closed the stream before the request finished")
        except grpc.aio.AioRpcError as exc:
            raise BackendError(HTTP_STATUS.get(exc.code().name, 500), exc.details() or exc.code().name) from None
        finally:
            done.set()
            if not finished:
                call.cancel()  # the HTTP client went away (or we failed): cancel the request in Triton
