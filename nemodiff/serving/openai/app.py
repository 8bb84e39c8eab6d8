"""The OpenAI-compatible API of `nemodiff serve --openai-port PORT` (a Starlette app).

checkpoint ──builder──▶ engine dir ──runtime──▶ Triton ──[OpenAI frontend]──▶ clients

`/v1/models`, `/v1/completions` and `/v1/chat/completions`, streamed (server-sent events
ending in `data: [DONE]`) or not, with `usage` and `finish_reason` (`stop` | `length`, and
`tool_calls` for a forced tool call, whose `message.tool_calls` is read from the constrained output;
structured output and tools: guided.py).
Requests go to the nemodiff Triton model over gRPC (`nemodiff.serving.openai.backend`), so
validation, limits, deadlines and the engine are those of the Triton endpoints; the body and
its fields are read by parse.py. Errors have OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, and status codes, whatever the request (a body nested 100k levels deep, a
lone surrogate, a field of the wrong type: 400, never a plain-text 500).

With `--api-key`, every `/v1` route wants `Authorization: Bearer KEY` (401 otherwise, as vLLM
and SGLang answer); `/health` stays open for probes, and so does `/metrics` (Triton's metrics port
passed through, as vLLM's API server serves it, so load tools that scrape their base URL find it). A client that hangs up cancels its
request, streamed or not, queued or running.

On a VLM engine, chat messages may carry `image_url` content parts whose URL is a `data:` URL
(base64); the server fetches nothing, so any other URL is refused. Each image part becomes an
`[IMG]` placeholder where it stands in the message, and the image travels to the model in its
`image_bytes_input` input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nemodiff.serving.control import FrontErrors
from nemodiff.serving.http.guard import BodyError, bearer_ok, read_body
from nemodiff.serving.openai.backend import BackendError, Piece, TritonBackend, triton_inputs
from nemodiff.serving.openai.choices import Choices, TokenStrings, finish_reason
from nemodiff.serving.openai.guided import tool_calls
from nemodiff.serving.openai.parse import COMPLETIONS_DEFAULT_MAX_TOKENS, InvalidRequest, RequestReader
from nemodiff.serving.triton.inputs import DEFAULT_MAX_N

log = logging.getLogger(__name__)
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
               413: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}


def error_response(status: int, message: str, param: str | None = None, code=None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status if code is None else code}}, status)


class HungUp(Exception):
    """The client closed its connection before its answer was ready."""


class OpenAIFrontend:
    def __init__(self, engine_dir: Path, backend: TritonBackend, served_model_name: str, max_body_bytes: int,
                 api_key: str | None = None, front_errors: FrontErrors | None = None, max_n: int = DEFAULT_MAX_N,
                 metrics_url: str | None = None):
        self.metrics_url = metrics_url
        self.reader = RequestReader(engine_dir, served_model_name, max_n)
        self.strings = TokenStrings(self.reader.tokenizer.decode)
        self.max_seq_len = self.reader.max_seq_len
        self.backend = backend
        self.model = served_model_name
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.errors = front_errors or FrontErrors(None)

    # -- endpoints ---------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        if (refusal := self._unauthorized(request)) is not None:
            return refusal
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "nemodiff",
             "max_model_len": self.max_seq_len}]})

    async def one_model(self, request: Request) -> Response:
        if (refusal := self._unauthorized(request)) is not None:
            return refusal
        name = request.path_params["model"]
        if name != self.model:
            return error_response(404, f"The model {name!r} does not exist; this server serves {self.model!r}",
                                  "model", code="model_not_found")
        return JSONResponse({"id": self.model, "object": "model", "created": 0, "owned_by": "nemodiff",
                             "max_model_len": self.max_seq_len})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200 if await self.backend.ready() else 503)

    async def metrics(self, request: Request) -> Response:
        """Triton's metrics port, passed through (open like it and /health: vLLM's API server serves /metrics
        without its key, and load tools scrape it next to their requests)."""
        if self.metrics_url is None:
            return error_response(404, "this server has no metrics endpoint", code="not_found")

        def scrape() -> tuple[bytes, str]:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
                return reply.read(), reply.headers.get("Content-Type", "text/plain; version=0.0.4; charset=utf-8")

        try:
            body, kind = await asyncio.to_thread(scrape)
        except (OSError, ValueError) as exc:
            return error_response(503, f"the metrics endpoint did not answer ({exc})")
        return Response(body, headers={"Content-Type": kind})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    def _unauthorized(self, request: Request) -> Response | None:
        if bearer_ok({k.lower(): v for k, v in request.headers.items()}, self.api_key):
            return None
        self.errors.count("unauthorized")
        given = "authorization" in request.headers
        message = ("Incorrect API key provided" if given else
                   "You didn't provide an API key: send the header 'Authorization: Bearer <key>'")
        return error_response(401, message, code="invalid_api_key")

    async def _serve(self, request: Request, chat: bool) -> Response:
        if (refusal := self._unauthorized(request)) is not None:
            return refusal
        try:
            return await self._answer(request, chat)
        except HungUp:
            return Response(status_code=499)  # nobody reads it: the client is gone and its request cancelled
        except Exception:  # a bug of ours must still answer in OpenAI's shape
            log.exception("the OpenAI frontend failed on a request")
            return error_response(500, "internal error in the OpenAI frontend")

    async def _answer(self, request: Request, chat: bool) -> Response:
        try:
            data = await read_body(request.receive, self.max_body_bytes, request.headers.get("content-length"))
            body = await asyncio.to_thread(self.reader.body, data) if len(data) > 2**18 else self.reader.body(data)
            fields = self.reader.common_fields(body, chat)
            guided, tool, tools = self.reader.guided(body, chat)
            fields |= guided
            if chat:
                prompt, prompt_len = self.reader.chat_prompt(body, tools)
                if fields["max_tokens"] is None:
                    fields["max_tokens"] = self.max_seq_len - prompt_len
            else:
                prompt = self.reader.completion_prompt(body)
                if fields["max_tokens"] is None:
                    fields["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
            if (fields.get("min_tokens") or 0) > fields["max_tokens"]:
                raise InvalidRequest(f"min_tokens ({fields['min_tokens']}) exceeds max_tokens ({fields['max_tokens']})",
                                     "min_tokens")
            triton_inputs(prompt | fields)  # every value converts to its input's type
        except ConnectionError:
            raise HungUp from None
        except BodyError as exc:
            self.errors.count("invalid")
            return error_response(exc.status, exc.message, exc.param)
        except (ValueError, TypeError, OverflowError) as exc:
            self.errors.count("invalid")
            return error_response(400, f"a field has a value of the wrong type or range: {exc}")
        pieces = self.backend.generate(prompt | fields)
        try:
            first = await _unless_hung_up(request, anext(pieces), pieces)
        except BackendError as exc:
            return error_response(exc.status, exc.message)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model}
        echoed = len(body["prompt"]) if not chat and body.get("echo") and isinstance(body.get("prompt"), str) else 0
        choices = Choices(fields.get("num_return_sequences") or 1, chat, self.strings,
                          bool(fields.get("return_log_probs")), echoed)
        if tool is not None:  # a forced tool call: answered whole (streamed as one delta per choice)
            return await self._tool_answer(request, first, pieces, meta, tool, body, choices)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = (bool(options.get("include_usage")), bool(options.get("continuous_usage_stats")))
            return StreamingResponse(self._events(first, pieces, meta, choices, *usage), media_type="text/event-stream")
        try:
            await _unless_hung_up(request, _collect(first, pieces, choices), pieces)
        except BackendError as exc:
            return error_response(exc.status, exc.message)
        return JSONResponse(meta | {"object": "chat.completion" if chat else "text_completion",
                                    "choices": choices.complete(), "usage": choices.usage()})

    async def _tool_answer(self, request: Request, first: Piece, pieces, meta: dict, tool, body: dict,
                           choices: Choices) -> Response:
        try:
            await _unless_hung_up(request, _collect(first, pieces, choices), pieces)
        except BackendError as exc:
            return error_response(exc.status, exc.message)
        answers = []
        for choice in choices.choices:
            text = "".join(choice.text)
            cut = choice.finish_reason == "length"  # OpenAI's truncated call: its partial arguments, "length"
            calls = tool_calls(tool, text, truncated=cut)
            answers.append((choice.index, text, calls,
                            "tool_calls" if calls and not cut else finish_reason(choice.finish_reason)))
        if not body.get("stream"):
            return JSONResponse(meta | {"object": "chat.completion", "usage": choices.usage(), "choices": [
                {"index": index, "message": {"role": "assistant", "content": None if calls else text}
                 | ({"tool_calls": calls} if calls else {}), "finish_reason": finish}
                for index, text, calls, finish in answers]})
        chunks = []
        for index, text, calls, finish in answers:
            delta = {"role": "assistant"} | ({"tool_calls": [c | {"index": i} for i, c in enumerate(calls)]}
                                             if calls else {"content": text})
            chunks += [{"index": index, "delta": delta, "finish_reason": None},
                       {"index": index, "delta": {}, "finish_reason": finish}]
        every = {"usage": choices.usage()} if (body.get("stream_options") or {}).get("continuous_usage_stats") else {}
        events = [f"data: {json.dumps(meta | {'object': 'chat.completion.chunk', 'choices': [c]} | every)}\n\n"
                  for c in chunks]
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = meta | {"object": "chat.completion.chunk", "choices": [], "usage": choices.usage()}
            events.append(f"data: {json.dumps(usage)}\n\n")
        return StreamingResponse(iter(events + ["data: [DONE]\n\n"]), media_type="text/event-stream")

    async def _events(self, first: Piece, pieces, meta: dict, choices: Choices, include_usage: bool,
                      continuous_usage: bool = False):
        """Chunks in the order the choices' responses arrive, each naming its choice's index; with
        continuous_usage, each carries the usage so far (as vLLM sends it)."""
        chat = choices.chat
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None, logprobs: dict | None = None,
                  role: bool = False) -> str:
            choice = choices.chunk_choice(index, text, reason, logprobs, role)
            usage = {}
            if continuous_usage:  # before the first response is counted: the prompt alone
                usage = {"usage": choices.usage() if choices.prompt_tokens else
                         {"prompt_tokens": first.num_input_tokens, "completion_tokens": 0,
                          "total_tokens": first.num_input_tokens}}
            return f"data: {json.dumps(meta | {'object': kind, 'choices': [choice]} | usage)}\n\n"

        try:
            if chat:
                for choice in choices.choices:
                    yield chunk(choice.index, "", None, role=True)
            piece = first
            while True:
                choice, logprobs = choices.add(piece)
                if piece.text or (logprobs and piece.token_ids):
                    yield chunk(choice.index, piece.text, None, logprobs)
                if piece.finish_reason is not None:
                    yield chunk(choice.index, None if chat else "", piece.finish_reason)
                if piece.final:
                    break
                piece = await anext(pieces)
        except BackendError as exc:
            error = {"message": exc.message, "type": ERROR_TYPES.get(exc.status, "server_error"), "param": None,
                     "code": exc.status}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:  # also when Starlette stops us because the client went away: that cancels the request
            await pieces.aclose()
        if include_usage:
            yield f"data: {json.dumps(meta | {'object': kind, 'choices': [], 'usage': choices.usage()})}\n\n"
        yield "data: [DONE]\n\n"


async def _collect(first: Piece, pieces, choices: Choices) -> None:
    piece = first
    while True:
        choices.add(piece)
        if piece.final:
            return
        piece = await anext(pieces)


async def _unless_hung_up(request: Request, work, pieces):
    """The result of `work`, unless the client hangs up first: then its request is cancelled (HungUp)."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        hangup.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    await pieces.aclose()  # the stream to Triton is cancelled: the engine frees the request
    raise HungUp


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine_dir, backend: TritonBackend, served_model_name: str, max_body_bytes: int,
               api_key: str | None = None, front_errors: FrontErrors | None = None,
               max_n: int = DEFAULT_MAX_N, metrics_url: str | None = None) -> Starlette:
    frontend = OpenAIFrontend(engine_dir, backend, served_model_name, max_body_bytes, api_key, front_errors, max_n,
                              metrics_url)
    return Starlette(routes=[
        Route("/v1/models", frontend.models, methods=["GET"]),
        Route("/v1/models/{model:path}", frontend.one_model, methods=["GET"]),
        Route("/v1/completions", frontend.completions, methods=["POST"]),
        Route("/v1/chat/completions", frontend.chat_completions, methods=["POST"]),
        Route("/health", frontend.health, methods=["GET"]),
        Route("/metrics", frontend.metrics, methods=["GET"]),
    ], exception_handlers={404: _no_route, 405: _no_method})


async def _no_route(request: Request, exc) -> Response:
    return error_response(404, f"no route {request.url.path!r}: this server serves /v1/models, /v1/completions, "
                          "/v1/chat/completions, /health and /metrics", code="not_found")


async def _no_method(request: Request, exc) -> Response:
    response = error_response(405, f"{request.method} is not allowed on {request.url.path}",
                              code="method_not_allowed")
    if getattr(exc, "headers", None) and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response
